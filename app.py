"""CIDM Studio: the Gradio app. Thin by design: one builder per tab, handlers that call `cidm`, no method logic.

Each browser session has its own library (a folder under the system temp dir named by a hash of the session id,
removed `CIDM_SESSION_TTL_HOURS` after its last use), unless `CIDM_LIBRARY` names one persistent library for everyone
(a duplicated private Space with storage at /data: single-user). Work on the model runs one request at a time
(`concurrency_id="gpu"`), so sessions share one base pipeline safely; each session may have `CIDM_MAX_JOBS` jobs
queued or running. Messages never show server paths.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import gradio as gr
import spaces
from gradio_image_annotation import image_annotator
from PIL import Image

from cidm import models, sessions
from cidm.bench.results import EXAMPLES, ia_curves, load_results, results_markdown
from cidm.demo import DEMO_LIBRARY, demo_fits, start_from_demo
from cidm.images import MAX_PIXELS, training_square
from cidm.library import Library, LibraryError
from cidm.sampling import SEED_MAX
from cidm.studio import Studio
from cidm.train import PREVIEW_EVERY

ON_SPACE = bool(os.environ.get("SPACE_ID"))  # decides the layout (the login button); tokens check SPACE_ID per call
SESSIONS = Path(tempfile.gettempdir()) / "cidm-sessions"
_BASE: dict = {}  # the base pipeline, loaded once on first use (keeps start-up fast)
_ACTIVE: dict = {}  # the Studio of the library in use (one at a time: requests are serialised)
_CANCEL: dict[str, threading.Event] = {}  # per session: Stop stops only the visitor's own learning
USER_ERRORS = (ValueError, LibraryError, models.BaseModelError, OSError)  # OSError: a full disk, a lost file
MAX_JOBS = int(os.environ.get("CIDM_MAX_JOBS", "2"))  # jobs one session may have queued or running at once
MAX_FILE_SIZE = os.environ.get("CIDM_MAX_FILE_SIZE", "25mb")  # the largest upload the server accepts
MAX_PHOTOS, MAX_STEPS, MAX_BOXES = 10, 1000, 8
APP_DIR = Path(__file__).resolve().parent
_JOBS = sessions.JobLimiter(MAX_JOBS)
BENCH_RESULTS = Path(__file__).resolve().parent / "bench" / "results" / "methods" / "results.json"
# small images (the toy world's 64 px) shown large with their pixels kept; captions of galleries of them wrap
CSS = (".enlarge img { width: 100% !important; height: 100% !important; object-fit: contain; "
       "image-rendering: pixelated; } .pixels img { image-rendering: pixelated; } "
       ".pixels .caption-label { white-space: normal; text-align: center; }")
CANVAS = 512  # pixels of the Compose canvas at least (the toy world's 64-px images are too small to draw on)


_LOAD_LOCK = threading.Lock()  # page-load events run in threads; model loading must happen once, not concurrently


def base():
    with _LOAD_LOCK:  # two concurrent loads break each other (transformers materialises weights from "meta")
        if "pipe" not in _BASE:
            _BASE["pipe"], _BASE["info"] = models.load_base()
    return _BASE["pipe"], _BASE["info"]


def session_id(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _library_root(request: gr.Request | None) -> Path:
    if os.environ.get("CIDM_LIBRARY"):
        return Path(os.environ["CIDM_LIBRARY"])
    return SESSIONS / sessions.session_key(session_id(request))


def library_path(request: gr.Request | None) -> Path:
    """This request's library: `CIDM_LIBRARY` (one for everyone), else the session's own folder inside SESSIONS,
    named by a hash of the session id (an id is never a path). Expired session folders are swept on the way."""
    if os.environ.get("CIDM_LIBRARY"):
        return Path(os.environ["CIDM_LIBRARY"])
    sessions.sweep_expired(SESSIONS, keep=tuple(p for p in [_ACTIVE.get("path")] if p))
    return sessions.session_dir(SESSIONS, session_id(request))


def studio(request: gr.Request | None) -> Studio:
    path = library_path(request)
    pipe, info = base()
    with _LOAD_LOCK:
        if _ACTIVE.get("path") != path:
            _ACTIVE.update(path=path, studio=Studio(path, pipe=pipe, info=info))
        else:
            _ACTIVE["studio"].refresh()  # another writer (the command line, a pull) may have changed it
        return _ACTIVE["studio"]


def public(text: str, request: gr.Request | None = None) -> str:
    """A message fit for a visitor: the server's folders (this library, the sessions folder, the temp folder, the
    app's folder, the home folder) are named in words, never shown as paths."""
    places = {str(_library_root(request)): "your library", str(SESSIONS): "the server", str(APP_DIR): "the app",
              tempfile.gettempdir(): "a temporary file", str(Path.home()): "the server"}
    for path in list(places):
        places.setdefault(os.path.realpath(path), places[path])
    for path in sorted(places, key=len, reverse=True):
        if len(path) > 1:
            text = re.sub(r"(?<![\w.-])" + re.escape(path) + r"(?:/[^\s'\"`),;]*)?", places[path], text)
    return text


def user_error(err: Exception, request: gr.Request | None = None) -> gr.Error:
    return gr.Error(public(str(err), request))


def whole_number(value, what: str, low: int, high: int) -> int:
    """A whole number from a field or an API call, or a gr.Error that says which field and what it takes."""
    wanted = f"{what} takes a whole number from {low} to {high}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise gr.Error(f"{what} is empty: {wanted}.")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(f"{wanted}; got {str(value)[:40]!r}.") from None
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise gr.Error(f"{wanted}; got {str(value)[:40]}.")
    return int(value) if isinstance(value, int) else int(number)


def real_number(value, what: str, low: float, high: float) -> float:
    """A finite number in [low, high] from a field or an API call, or a gr.Error."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise gr.Error(f"{what} takes a number from {low:g} to {high:g}; got {str(value)[:40]}.")
    return number


def hub_token(oauth_token: gr.OAuthToken | None) -> str | None:
    """The token for the Hub: the visitor's own (Sign in with Hugging Face). The server's HF_TOKEN only off a Space,
    or on a Space whose owner set CIDM_SHARE_HF_TOKEN=1 (every visitor then acts as the owner)."""
    if oauth_token is not None and getattr(oauth_token, "token", None):
        return oauth_token.token
    if not os.environ.get("SPACE_ID") or os.environ.get("CIDM_SHARE_HF_TOKEN") == "1":
        return os.environ.get("HF_TOKEN") or None
    raise gr.Error("Sign in with the Hugging Face button first: on this Space, the Hub is reached with your own "
                   "account, never the Space's.")


def admit(n_inputs: int):
    """A validator for an event with `n_inputs` inputs, run before its job joins the queue: at most MAX_JOBS jobs of
    one session queued or running, so that one visitor cannot fill the queue. (Gradio passes a validator the
    event's inputs, and the request after them when a named positional parameter asks for it.)"""
    def check(*args):
        request = args[n_inputs] if len(args) > n_inputs else None
        sid = session_id(request)
        queue = getattr(_DEMO.get("demo"), "_queue", None)
        events = list(getattr(queue, "event_ids_to_events", {}).items())
        ok = [gr.validate(True, "")] * n_inputs
        if _JOBS.admit(sid, {i for i, e in events if getattr(e, "session_hash", None) == sid}):
            return ok
        return [gr.validate(False, f"You already have {MAX_JOBS} jobs waiting or running; wait until one "
                                   f"finishes.")] + ok[1:]

    params = [inspect.Parameter(f"input_{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in range(n_inputs)]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                    annotation=gr.Request))
    check.__signature__ = inspect.Signature(params)
    check.__annotations__ = {"request": gr.Request}
    return check


def counted(fn):
    """`fn` runs as a job of its session: from admitted (waiting) to running, for `admit`'s count (a generator, as
    long as it streams)."""
    signature = inspect.signature(fn)

    def session(args, kwargs) -> str:
        return session_id(signature.bind_partial(*args, **kwargs).arguments.get("request"))

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with _JOBS.running(session(args, kwargs)):
            return fn(*args, **kwargs)

    @functools.wraps(fn)
    def stream(*args, **kwargs):
        with _JOBS.running(session(args, kwargs)):
            yield from fn(*args, **kwargs)

    return stream if inspect.isgeneratorfunction(fn) else run


_DEMO: dict = {}  # the app's Blocks, for `admit` to read its queue


def concept_names(request: gr.Request | None) -> list[str]:
    """The session's concepts, read from its library on disk (never switches the shared model's active library,
    which a training of another session may be using)."""
    try:
        return Library(library_path(request), read_only=True).names
    except USER_ERRORS:
        return []


# ----------------------------------------------------------------------------------------------------------------
# Learn


THUMBNAIL = 128  # pixels of a photo's thumbnail: its centre square, as learning sees it
STREAM_EVERY = 0.5  # seconds between two updates of the Learn tab while a concept trains
SMOOTH = 20  # steps: the loss curve's running mean (each step's loss jumps with its random timestep)


def photo_paths(files) -> list[str]:
    """The uploaded photos' paths, or a gr.Error unless there are 3 to MAX_PHOTOS."""
    if not files:
        raise gr.Error("No photos: upload 3–10 photos of your concept.")
    if not isinstance(files, (list, tuple)) or not 3 <= len(files) <= MAX_PHOTOS:
        count = len(files) if isinstance(files, (list, tuple)) else 1
        raise gr.Error(f"{count} photos: upload between 3 and {MAX_PHOTOS} photos of your concept.")
    return [f if isinstance(f, str) else f.name for f in files]


def photo_thumbnails(files, request: gr.Request = None) -> list:
    """The uploads as learning will see them (each one's centre square), read within the pixel budget. A file that
    cannot be used is named in a warning (Learn refuses it in the same words); past MAX_PHOTOS, none is read."""
    files = [] if not files else files if isinstance(files, (list, tuple)) else [files]
    if len(files) > MAX_PHOTOS:
        gr.Warning(f"{len(files)} photos: Learn takes 3 to {MAX_PHOTOS}; remove {len(files) - MAX_PHOTOS}.")
    thumbnails = []
    for f in files[:MAX_PHOTOS]:
        try:
            thumbnails.append(training_square(f if isinstance(f, str) else f.name, THUMBNAIL))
        except USER_ERRORS as err:
            gr.Warning(public(str(err), request))
    return thumbnails


@functools.cache
def toy_examples() -> tuple[dict, ...]:
    """The toy world's standard sequence as one-click examples: name, class word, kind and photos of each."""
    if not (EXAMPLES / "concepts.json").exists():
        return ()
    spec = json.loads((EXAMPLES / "concepts.json").read_text())
    return tuple({"name": n, "class_word": spec["concepts"][n]["class_word"], "kind": spec["concepts"][n]["kind"],
                  "photos": [str(EXAMPLES / f) for f in spec["concepts"][n]["images"]]}
                 for n in spec["standard_sequence"])


def pick_example(evt: gr.SelectData):
    """A click on an example concept fills the form: its photos, name, class word and kind."""
    example = toy_examples()[evt.index]
    return example["photos"], example["name"], example["class_word"], example["kind"]


def duration(seconds: float) -> str:
    """A time left as a person reads it: '45 s', '3 min 20 s'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(5 * round(seconds / 5), 60)
    return f"{minutes} min" + (f" {seconds} s" if seconds else "")


class LearnView:
    """What the Learn tab shows while a concept trains. The training thread's callbacks write it (list appends, which
    are atomic); the stream reads it."""

    def __init__(self, steps: int, cancel: threading.Event, clock=time.monotonic):
        self.steps, self.cancel, self.clock = steps, cancel, clock
        self.losses: list[dict] = []  # {"step", "loss"} of each step
        self.times: list[float] = []  # when each step ended
        self.previews: list[tuple] = []  # (image, caption) of each preview

    def step(self, step: int, terms: dict) -> None:
        self.times.append(self.clock())
        self.losses.append({"step": step, "loss": terms["diffusion"]})

    def preview(self, step: int, images: list) -> None:
        self.previews.append((images[0], f"step {step}"))

    def seconds_left(self) -> float | None:
        """The steps to go at the pace of the last PREVIEW_EVERY steps: it follows a machine that slows down or
        speeds up, and once past the first preview it holds one preview, as every PREVIEW_EVERY steps ahead do."""
        done, window = len(self.times), self.times[-PREVIEW_EVERY - 1:]
        return None if done < 3 else (window[-1] - window[0]) / (len(window) - 1) * (self.steps - done)

    def status(self) -> str:
        if self.cancel.is_set():
            return "Stopping after the current step…"
        if not self.losses:
            return "Reading your photos and preparing the model…"
        step, loss = self.losses[-1]["step"], self.losses[-1]["loss"]
        text = f"**Step {step} of {self.steps}** · loss {loss:.4f}"
        if step == self.steps:
            return text + " · saving the concept and drawing every concept again for the Forgetting tab…"
        left = self.seconds_left()
        return text + (" · measuring the time a step takes…" if left is None else f" · about {duration(left)} left")

    def plot(self):
        """Each step's loss, and its running mean over SMOOTH steps (the `curve` column tells them apart)."""
        import pandas as pd

        each = pd.DataFrame(self.losses or [{"step": 0, "loss": 0.0}])
        mean = each.assign(loss=each["loss"].rolling(SMOOTH, min_periods=1).mean())
        return pd.concat([each.assign(curve="each step"), mean.assign(curve=f"mean of {SMOOTH} steps")],
                         ignore_index=True)

    def shown(self, status: str | None = None) -> tuple:
        return status or self.status(), self.plot(), list(self.previews)


def in_background(work, cancel: threading.Event, every: float):
    """Runs `work()` in a thread of its own: yields None every `every` seconds while it runs, then its result (its
    error is raised here). A stream closed early (the visitor left) cancels the work and waits for its end, so the
    model never serves two jobs at once."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except BaseException as err:  # noqa: BLE001  (raised again in the stream's thread)
            outcome["error"] = err

    thread = threading.Thread(target=run, name="cidm-learn", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(every)
            yield None
    finally:
        if thread.is_alive():
            cancel.set()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["result"]


@spaces.GPU(duration=300)
@counted
def learn(files, name, class_word, kind, steps, seed, replace, request: gr.Request = None):
    """Learns a concept, showing meanwhile the step, the loss curve, the time left and a preview of the concept
    every PREVIEW_EVERY steps. The last update is the result: a message, the loss curve, samples."""
    paths = photo_paths(files)
    name = (name or "").strip()  # the same name for learning and everything after it
    steps = whole_number(steps, "Training steps", 1, MAX_STEPS)
    seed = whole_number(seed, "Seed", 0, SEED_MAX)
    key = sessions.session_key(session_id(request))
    cancel = _CANCEL[key] = threading.Event()  # this session's own: another visitor's Stop cannot reach it
    view, shown = LearnView(steps, cancel), None
    try:
        s = studio(request)
        work = functools.partial(s.learn, name, paths, class_word or "", kind, replace=bool(replace), steps=steps,
                                 seed=seed, progress=view.step, cancel=cancel.is_set, preview=view.preview)
        with contextlib.closing(in_background(work, cancel, STREAM_EVERY)) as stream:  # closed early: cancelled
            for result in stream:
                if result is None and shown != (len(view.losses), len(view.previews), cancel.is_set()):
                    shown = (len(view.losses), len(view.previews), cancel.is_set())
                    yield view.shown()
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    finally:
        if _CANCEL.get(key) is cancel:
            del _CANCEL[key]
    if result.cancelled:
        yield view.shown(f"Stopped after {result.steps_done} steps; the library is unchanged.")
        return
    message = f"Learned `<{name}>` in {result.seconds:.0f} s. Write `<{name}>` in a prompt to use it."
    yield view.shown(message + " Drawing samples…")
    yield message, view.plot(), learned_samples(s, name)


def learned_samples(s: Studio, name: str) -> list[tuple]:
    """Two images of the new concept, and one of each of the two concepts learned before it."""
    samples = [(im, s.probe_prompt(name)) for im in s.generate(s.probe_prompt(name), num_images=2)]
    for old in [n for n in s.names if n != name][-2:]:
        samples.append((s.generate(s.probe_prompt(old))[0], f"earlier: {s.probe_prompt(old)}"))
    return samples


def stop(request: gr.Request = None):
    cancel = _CANCEL.get(sessions.session_key(session_id(request)))
    if cancel is None:
        return "Nothing to stop: you are not learning a concept."
    cancel.set()
    return "Stopping after the current step…"


def build_learn_tab():
    examples = toy_examples()
    if examples:  # the toy world's concepts, one click each
        gr.Markdown("**No photos at hand?** Click a toy-world concept to fill the form with its photos.")
        picker = gr.Gallery([(e["photos"][0], f"{e['name']} ({e['class_word']})") for e in examples],
                            label="Toy-world concepts", show_label=False, columns=len(examples), height=140,
                            allow_preview=False, interactive=False, buttons=[], elem_id="toy-examples",
                            elem_classes="pixels")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="3–10 photos of your concept", file_count="multiple", file_types=["image"],
                            height=120)
            photos = gr.Gallery(label="Your photos, as learning sees them (the centre square)", columns=5,
                                height=160, allow_preview=False, interactive=False, buttons=[], elem_id="photos",
                                elem_classes="pixels")
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
            status = gr.Markdown(f"Upload photos or click a toy-world concept above, then press **Learn**. While it "
                                 f"learns, a preview of your concept comes every {PREVIEW_EVERY} steps; at the end, "
                                 f"samples of it and of two earlier concepts.")
            with gr.Row():
                plot = gr.LinePlot(x="step", y="loss", color="curve", height=320, colors_in_legend=[],
                                   label=f"Loss (orange: mean of {SMOOTH} steps)",
                                   color_map={"each step": "#d1d5db", f"mean of {SMOOTH} steps": "#f97316"})
                samples = gr.Gallery(label="Your concept as it learns", columns=2, height=320, object_fit="contain",
                                     elem_id="learn-samples", elem_classes="pixels")
    if examples:
        picker.select(pick_example, None, [files, name, class_word, kind], api_visibility="private")
    files.change(photo_thumbnails, files, photos, api_visibility="private", show_progress="hidden")
    train.click(learn, [files, name, class_word, kind, steps, seed, replace], [status, plot, samples],
                api_name="learn", concurrency_id="gpu", validator=admit(7), show_progress="minimal")
    halt.click(stop, None, status, api_name="stop", show_progress="hidden")


# ----------------------------------------------------------------------------------------------------------------
# Generate


@spaces.GPU(duration=60)
@counted
def generate(prompt, negative, num_images, steps, guidance, seed, request: gr.Request = None):
    settings = dict(num_images=whole_number(num_images, "Images", 1, 8), steps=whole_number(steps, "Steps", 1, 100),
                    guidance=real_number(guidance, "Guidance", 1.0, 15.0), seed=whole_number(seed, "Seed", 0, SEED_MAX))
    try:
        images = studio(request).generate(prompt or "", negative or "", **settings)
    except USER_ERRORS as err:
        raise user_error(err, request) from err
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
          api_name="generate", concurrency_id="gpu", validator=admit(6))
    return prompt


# ----------------------------------------------------------------------------------------------------------------
# Compose


def blank_canvas(request: gr.Request = None):
    """An empty canvas of the output size whose box labels are the session's concepts."""
    size = max(base()[1].resolution, CANVAS)  # boxes are read relative to the canvas, so it can be drawn on large
    names = concept_names(request)
    return image_annotator(value={"image": Image.new("RGB", (size, size), (235, 235, 235)), "boxes": []},
                           label_list=names or ["(learn a concept first)"])


@spaces.GPU(duration=120)
@counted
def compose(annotation, prompt, box_prompts, steps, guidance, seed, request: gr.Request = None):
    boxes = (annotation or {}).get("boxes") or []
    if not boxes:
        raise gr.Error("No boxes: draw a box on the canvas for each concept, and pick its label.")
    if len(boxes) > MAX_BOXES:
        raise gr.Error(f"{len(boxes)} boxes: draw at most {MAX_BOXES}.")
    settings = dict(steps=whole_number(steps, "Steps", 1, 100), guidance=real_number(guidance, "Guidance", 1.0, 15.0),
                    seed=whole_number(seed, "Seed", 0, SEED_MAX))
    canvas = annotation.get("image")
    if canvas is None:  # boxes without a canvas (API callers): pixels of the output image
        cw = ch = base()[1].resolution
    else:
        cw, ch = canvas.size if isinstance(canvas, Image.Image) else image_size(canvas)
    overrides = [line.strip() for line in (box_prompts or "").splitlines()]
    regions = []
    for i, b in enumerate(boxes):
        label = str(b.get("label") or "")
        text = overrides[i] if i < len(overrides) and overrides[i] else (f"a photo of a <{label}>" if label else "")
        try:
            x0, y0, x1, y1 = (float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError) as err:
            raise gr.Error(f"Box {i + 1} needs numbers xmin, ymin, xmax, ymax.") from err
        box = (max(0.0, x0 / cw), max(0.0, y0 / ch), min(1.0, x1 / cw), min(1.0, y1 / ch))  # relative, on the canvas
        if not (box[0] < box[2] and box[1] < box[3]):
            raise gr.Error(f"Box {i + 1} lies outside the {cw}×{ch} canvas or is empty: draw it on the canvas.")
        regions.append((box, text))
    try:
        image = studio(request).compose(prompt or "", regions, **settings)[0]
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    w, h = image.size
    return image, (image, [((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)), text)
                           for (x0, y0, x1, y1), text in regions])


def build_compose_tab():
    with gr.Row():
        with gr.Column():
            canvas = checked_upload(image_annotator(label="Draw a box per concept; its label is the concept",
                                                    label_list=[], image_type="filepath"), "The canvas")
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
                 concurrency_id="gpu", validator=admit(6))
    fresh.click(blank_canvas, None, canvas, api_name="canvas")
    with gr.Accordion("Edit inside a box of your own image", open=False):
        with gr.Row():
            with gr.Column():
                source = checked_upload(gr.Image(label="Image", type="filepath", image_mode=None),  # decoded by
                                        "The image to edit")  # `cidm.images`, within the pixel budget
                box = gr.Textbox(label="Box x0,y0,x1,y1 (pixels, or 0–1)", value="0,0,0.5,0.5")
                edit_prompt = gr.Textbox(label="What goes in the box", placeholder="a photo of a <name>")
                strength = gr.Slider(0.1, 1.0, value=0.8, step=0.05, label="Strength")
                edit_button = gr.Button("Edit")
            edited = gr.Image(label="Edited", type="pil", elem_classes="enlarge")
    edit_button.click(edit, [source, box, edit_prompt, strength, steps, guidance, seed], edited, api_name="edit",
                      concurrency_id="gpu", validator=admit(7))
    return canvas


def image_size(path, what: str = "The canvas") -> tuple[int, int]:
    """Width and height from a file's header (nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget is checked by the caller
            with Image.open(path) as im:
                return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise gr.Error(f"{what} is not an image: upload a JPEG, PNG or WebP.") from err


def checked_upload(component, what: str):
    """An image component whose upload is checked before the component decodes it: the pixel budget of every upload
    (read from the file's header), and a file that is not an image or a malformed value (a box without numbers, a
    zero scale) as a clear error instead of a crash."""
    preprocess = component.preprocess

    def checked(payload):
        path = getattr(payload, "path", None) or getattr(getattr(payload, "image", None), "path", None)
        if path:
            w, h = image_size(path, what)
            if w * h > MAX_PIXELS:
                raise gr.Error(f"{what} is {w}×{h} pixels, more than the {MAX_PIXELS // 10 ** 6} M an upload may "
                               f"have: upload a smaller image.")
        try:
            return preprocess(payload)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError, OSError) as err:
            raise gr.Error(f"{what} is malformed: upload a JPEG, PNG or WebP image (and draw boxes on the canvas "
                           f"the app gives).") from err

    component.preprocess = checked
    return component


def parse_box(text) -> tuple[float, ...]:
    try:
        coords = tuple(float(v) for v in str(text or "").split(","))
    except ValueError:
        coords = ()
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
        raise gr.Error(f"Box {str(text)[:40]!r}: write four numbers x0,y0,x1,y1 (pixels, or 0–1), e.g. 0,0,0.5,0.5.")
    return coords


@spaces.GPU(duration=60)
@counted
def edit(image, box, prompt, strength, steps, guidance, seed, request: gr.Request = None):
    if image is None:
        raise gr.Error("No image: upload the image to edit.")
    coords = parse_box(box)
    settings = dict(strength=real_number(strength, "Strength", 0.05, 1.0), steps=whole_number(steps, "Steps", 1, 100),
                    guidance=real_number(guidance, "Guidance", 1.0, 15.0), seed=whole_number(seed, "Seed", 0, SEED_MAX))
    try:
        return studio(request).edit(image, coords, prompt or "", **settings)
    except USER_ERRORS as err:
        raise user_error(err, request) from err


# ----------------------------------------------------------------------------------------------------------------
# Forgetting


def forgetting(request: gr.Request = None):
    from cidm.plots import forgetting_grid, ia_heatmap, ia_lines

    s = studio(request)
    (scores, measured_at), text_scores = s.library.forgetting_record("ia"), s.forgetting("ta")
    tasks = sorted(scores)

    def cell(t, n):
        ia, ta = scores[t].get(n), text_scores.get(t, {}).get(n)
        text = "" if ia is None else (f"{ia:.1f}" if ta is None else f"{ia:.1f} / {ta:.1f}")
        return f"({text})" if text and measured_at[t].get(n, t) != t else text  # carried, not re-generated

    rows = [[f"<{n}>", *[cell(t, n) for t in tasks]] for n in s.names]
    header = ["concept", *[f"after task {t} (IA / TA)" for t in tasks]]
    grid = forgetting_grid(s.library.root, s.names, tasks, measured_at=measured_at) if tasks else None
    has_ia = any(scores[t] for t in tasks)
    heatmap = ia_heatmap(scores, s.names) if has_ia else None
    lines = None
    if has_ia:  # measured points only
        lines = ia_lines({f"<{n}>": {t: scores[t][n] for t in tasks if measured_at[t].get(n) == t and n in scores[t]}
                          for n in s.names}, title="IA of each concept, from the task that learned it")
    return gr.update(value=rows, headers=header), grid, heatmap, lines


def build_forgetting_tab():
    gr.Markdown(f"After each new task the new concept and the {Studio.forgetting_budget - 1} concepts measured "
                f"longest ago are re-generated (fixed prompt and seed), so the record costs the same at the 30th "
                f"concept as at the 4th; the other cells keep their last measurement (faded in the grid, in "
                f"parentheses in the table). IA is the image similarity to the concept's own photos (×100): a "
                f"falling row means forgetting.")
    refresh = gr.Button("Refresh")
    table = gr.Dataframe(label="IA after each task", interactive=False)
    grid = gr.Image(label="Concept × after task", type="pil")
    with gr.Row():
        heatmap = gr.Plot(label="IA heatmap")
        lines = gr.Plot(label="IA over tasks")
    refresh.click(forgetting, None, [table, grid, heatmap, lines], api_name="forgetting", concurrency_id="gpu")
    outputs = [table, grid, heatmap, lines]
    with gr.Accordion("All methods side by side (a `cidm bench` results file)", open=False):
        results = gr.File(label="results.json (default: the toy-world benchmark shipped with the project)",
                          file_types=[".json"], value=str(BENCH_RESULTS) if BENCH_RESULTS.exists() else None)
        compare = gr.Button("Show")
        tables = gr.Markdown()
        curves = gr.Plot(label="Average IA of the learned concepts after each task")
    compare.click(methods_view, results, [tables, curves], api_name="methods")
    return outputs


def methods_view(results_file):
    """The benchmark's tables (IA, TA, forgetting, time) and the average-IA curve of every method."""
    from cidm.plots import ia_lines

    path = results_file if isinstance(results_file, str) else getattr(results_file, "name", None)
    if not path:
        raise gr.Error("No results file: run `python -m cidm bench --out DIR` and pick DIR/results.json.")
    try:
        results = load_results(path)
        return results_markdown(results, results["protocol"]["tasks"]), ia_lines(ia_curves(results))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise gr.Error(public(f"{Path(path).name} is not a `cidm bench` results.json ({err!r}); pick "
                              f"DIR/results.json of a benchmark run")) from err


# ----------------------------------------------------------------------------------------------------------------
# Library


def library_view(request: gr.Request = None):
    try:
        lib = Library(library_path(request), read_only=True)  # reading only: safe beside a running task
        rows = [[n, r["class_word"], r["kind"], r.get("task", ""), r.get("created", ""), r.get("seconds", "")]
                for n, r in ((n, lib.record(n)) for n in lib.names)]
        images = [(str(p), f"<{n}>") for n in lib.names for p in lib.images(n)[:2]]  # files inside the library only
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    return rows, images, gr.update(choices=lib.names, value=None)


@spaces.GPU(duration=30)
@counted
def delete(name, request: gr.Request = None):
    if not name:
        raise gr.Error("Pick a concept to delete.")
    try:
        studio(request).delete(name)
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    return library_view(request)


def download(request: gr.Request = None):
    """The library as a zip: a snapshot of the files its manifest names (never a half-written change), kept as the
    session's only download until the session expires."""
    root = library_path(request)
    if not (root / "library.json").exists():
        raise gr.Error("The library is empty: learn a concept first.")
    try:
        lib = Library(root)
        folder = sessions.download_dir(SESSIONS, session_id(request))
        with lib.staging() as stage:
            lib.snapshot(stage / "library")
            archive = shutil.make_archive(str(folder / "cidm-library"), "zip", stage / "library")
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    return archive


def push(repo_id, private, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None):
    from cidm.hub import push_library

    token = hub_token(oauth_token)
    try:
        url = push_library(library_path(request), (repo_id or "").strip(), token, private=bool(private),
                           endpoint=os.environ.get("HF_ENDPOINT"))
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    return f"Pushed to {url}"


@counted
def pull(repo_id, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None):
    """Load a library from the Hub into this session's (empty) library."""
    from cidm.hub import pull_library

    token = hub_token(oauth_token)
    path = library_path(request)
    pipe, info = base()
    repo_id = (repo_id or "").strip()
    try:
        pull_library(repo_id, path, token, endpoint=os.environ.get("HF_ENDPOINT"),
                     base=(info.source, info.num_cross_attn_layers))
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    with _LOAD_LOCK:
        _ACTIVE.clear()  # the next use loads the pulled library
    rows, images, names = library_view(request)
    return rows, images, names, f"Loaded {len(rows)} concepts from `{repo_id}`."


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
    remove.click(delete, name, [table, images, name], api_name="delete", concurrency_id="gpu",
                 validator=admit(1))
    zipped.click(download, None, zipped, api_name="download")
    upload.click(push, [repo, private], status, api_name="push")
    download_hub.click(pull, repo, [table, images, name, status], api_name="pull", concurrency_id="gpu",
                       validator=admit(1))


# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# First visit


def welcome(request: gr.Request = None):
    """The first-visit choice, shown while the visitor's library is empty and a demo library is shipped."""
    info = base()[1]
    return gr.update(visible=not concept_names(request) and demo_fits(info.source, info.num_cross_attn_layers,
                                                                         DEMO_LIBRARY))


def demo_canvas(names: list[str], kinds: dict[str, str]):
    """A canvas with two boxes, side by side, for the first two object concepts: Compose works at one click."""
    size = max(base()[1].resolution, CANVAS)
    objects = [n for n in names if kinds.get(n) == "object"][:2]
    boxes = [{"xmin": int(size * (0.04 + 0.5 * i)), "ymin": int(size * 0.25), "xmax": int(size * (0.46 + 0.5 * i)),
              "ymax": int(size * 0.75), "label": n} for i, n in enumerate(objects)]
    return image_annotator(value={"image": Image.new("RGB", (size, size), (235, 235, 235)), "boxes": boxes},
                           label_list=names)


@counted
def start_demo(request: gr.Request = None):
    """Copy the demo library into the visitor's own library; fill Generate, Compose and Forgetting from it."""
    try:
        names = start_from_demo(library_path(request))
        s = studio(request)
    except USER_ERRORS as err:
        raise user_error(err, request) from err
    kinds = {n: s.library.record(n)["kind"] for n in names}
    first = next((n for n in names if kinds[n] == "object"), names[0])
    message = (f"Your library now holds the demo's {len(names)} concepts ({', '.join(f'`<{n}>`' for n in names)}), "
               f"learned one after another. Compose has two of them in boxes; Forgetting shows each concept after "
               f"every task. What you learn or delete changes your copy only.")
    return (gr.update(visible=False), message, f"a photo of a <{first}> on a beach", demo_canvas(names, kinds),
            *forgetting(request))


def build_welcome():
    with gr.Group(visible=False) as box:
        gr.Markdown("**Your library is empty.** Start from the demo library: ten concepts (seven objects, three "
                    "styles) learned one after another on this base model, with the record of how each held up "
                    "after every later task. Or start empty and teach your own.")
        with gr.Row():
            start = gr.Button("Start from the demo library (10 concepts)", variant="primary")
            empty = gr.Button("Start empty")
    empty.click(lambda: gr.update(visible=False), None, box)
    return box, start


def build_app() -> gr.Blocks:
    # Gradio's own copies (uploads, results, downloads) are deleted after the same time to live as session folders
    ttl = int(sessions.TTL_SECONDS)
    with gr.Blocks(title="CIDM Studio", delete_cache=(min(3600, ttl), ttl)) as demo:
        base = models.display_name(models.default_model())  # a name for people, never the server's path
        gr.Markdown("# CIDM Studio\nLearn your own concepts one after another without forgetting the earlier ones, "
                    f"and compose them where you draw boxes. Base model: {base}.")
        if ON_SPACE:
            gr.Markdown(f"Your concepts and photos stay in your browser session: nobody else sees them, and they are "
                        f"deleted {ttl // 3600} hours after your last use. For a private library that persists, and a "
                        f"GPU, duplicate this Space.")
            gr.DuplicateButton()
        first_visit, start = build_welcome()
        started = gr.Markdown()
        with gr.Tabs():
            with gr.Tab("Generate"):
                prompt = build_generate_tab()
            with gr.Tab("Learn a concept"):
                build_learn_tab()
            with gr.Tab("Compose"):
                canvas = build_compose_tab()
            with gr.Tab("Forgetting"):
                record = build_forgetting_tab()
            with gr.Tab("Library"):
                build_library_tab()
        start.click(start_demo, None, [first_visit, started, prompt, canvas, *record], api_name="start_demo",
                    concurrency_id="gpu")
        demo.load(blank_canvas, None, canvas)
        demo.load(welcome, None, first_visit)
    demo.queue(max_size=16, default_concurrency_limit=1)
    _DEMO["demo"] = demo
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the app's limits (the largest upload) and look."""
    return demo.launch(**{"max_file_size": MAX_FILE_SIZE, "css": CSS, **kwargs})


if __name__ == "__main__":
    launch(build_app(), server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
