"""The embedded toy world: shipped models load through the SD code path and do real work; concepts are consistent."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cidm import models
from cidm.bench.results import EXAMPLES
from cidm.toyworld import concepts as C
from cidm.toyworld import quality

MODEL = models.EMBEDDED_MODEL
LEARN_STEPS = 150  # half the default task
IDENTIFIED = 0.5  # share of the learned concept's images identified as it (chance: 1 in 10)
PLAIN_IDENTIFIED = 0.3  # the same through a stock pipeline, which gives every layer one text: 3× chance. Read by
# the evaluator at 3,000 steps, which sees the inner part, it identified 37.5 % of 8 images (CIDM Studio: 75 %)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def evaluator():
    return models.load_evaluator(models.find_evaluator(str(MODEL)), "cpu")


def test_tokenizer_is_rebuilt_exactly_from_the_world_words():
    from transformers import CLIPTokenizer

    from cidm.toyworld.train import build_tokenizer

    shipped = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    assert build_tokenizer().get_vocab() == shipped.get_vocab()
    ids = shipped("a close-up photo of an orange star with black stripes in the snow").input_ids
    assert len(ids) == 17  # one token per word (13; "close-up" is three), plus BOS and EOS


def test_default_base_without_gpu_is_the_embedded_model(monkeypatch):
    monkeypatch.delenv("CIDM_BASE_MODEL", raising=False)
    if torch.cuda.is_available():
        pytest.skip("with CUDA the default is SD-1.5")
    pipe, info = models.load_base()
    assert info.source == str(MODEL) and info.num_cross_attn_layers == 4 and info.resolution == 64
    assert info.evaluator == str((MODEL / "evaluator").resolve())


def test_toy_evaluator_is_a_dual_encoder_that_saves_and_loads_through_auto_classes(tmp_path):
    """The CNN image tower round-trips through `save_pretrained` / `load_evaluator` (AutoModel), with CLIP's API."""
    from transformers import CLIPTokenizer, VisionTextDualEncoderModel

    from cidm.toyworld.evaluator import GlyphCNNModel, make_evaluator
    from cidm.toyworld.train import evaluator_text_config

    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    torch.manual_seed(0)
    model = make_evaluator(evaluator_text_config(tokenizer)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = models.load_evaluator(str(tmp_path), "cpu")
    assert isinstance(loaded, VisionTextDualEncoderModel) and isinstance(loaded.vision_model, GlyphCNNModel)
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    feats = loaded.get_image_features(pixel_values=pixels).pooler_output
    assert feats.shape == (3, 128)
    assert torch.allclose(feats, model.get_image_features(pixel_values=pixels).pooler_output, atol=1e-5)
    ids = tokenizer(["a photo of a red star"], return_tensors="pt").input_ids
    assert loaded.get_text_features(input_ids=ids).pooler_output.shape == (1, 128)


def test_an_evaluator_folder_that_is_not_clip_style_gets_a_clear_error(tmp_path):
    import shutil

    not_clip = tmp_path / "text-only"  # a model transformers loads, but with no image embeddings
    shutil.copytree(MODEL / "text_encoder", not_clip)
    for f in (MODEL / "tokenizer").iterdir():
        shutil.copy(f, not_clip)
    with pytest.raises(models.BaseModelError, match="no image and text embeddings"):
        models.load_evaluator(str(not_clip), "cpu")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(models.BaseModelError, match="could not load the evaluator"):
        models.load_evaluator(str(unknown), "cpu")


def test_evaluator_reads_world_images(evaluator):
    acc = quality.evaluator_accuracy(*evaluator, n=96, seed=quality.HELD_OUT_SEED + 77)
    # chance: 1/6 shape, 1/12 colours, 1/9 inner part, 1/12 inner colour, 1/18 context. On 1,000 images the shipped
    # evaluator reads 100 / 99.8 / 96.5 / 98.3 / 100 % (these 96 images: 100 / 100 / 96.9 / 100 / 100 %): the floors
    # leave room for 96 images' spread, so that a regression (the first version's ViT: 38 % on shapes; this CNN at
    # 1,500 steps: 83 % on inner parts) fails
    floors = {"shape": 0.93, "colour": 0.93, "inner": 0.9, "inner_colour": 0.93, "context": 0.95}
    assert all(acc[a] >= floor for a, floor in floors.items()), acc


def test_generated_images_follow_their_prompts_above_chance(pipe, evaluator):
    acc, images, prompts = quality.generator_accuracy(pipe, *evaluator, n=24, steps=10, batch_size=24)
    assert images.shape == (24, 64, 64, 3)
    assert acc["colour"] >= 0.4 and acc["inner"] >= 0.3, acc  # chance is 1/12 and 1/9


def test_concept_set_follows_the_protocol():
    spec = json.loads((EXAMPLES / "concepts.json").read_text())
    assert len(spec["concepts"]) >= 12
    sequence = spec["standard_sequence"]
    assert len(sequence) == 10 and not set(sequence) & set(spec["tuning_sequence"])
    kinds = [spec["concepts"][n]["kind"] for n in sequence]
    assert [i + 1 for i, k in enumerate(kinds) if k == "style"] == [6, 8, 10]
    for name, c in spec["concepts"].items():
        assert 3 <= len(c["images"]) <= 6 and len(c["captions"]) == len(c["images"])
        assert len(c["eval_prompts"]) == len(c["eval_texts"]) >= 10
        assert all(f"<{name}>" in p for p in c["eval_prompts"] + c["captions"])
        assert not any("<" in t for t in c["eval_texts"])


def test_concept_images_are_reproduced_exactly_by_the_generator():
    for name in ("medic", "pixelart"):
        images, _ = C.reference_images(name)
        for i, img in enumerate(images):
            np.testing.assert_array_equal(np.asarray(Image.open(EXAMPLES / name / f"{i}.png")), img)


def test_methods_that_learn_alike_share_one_training_run(tmp_path):
    from cidm.bench.methods import run_methods_bench, training_groups

    groups = training_groups(["cidm", "lora-m", "finetune", "lora-c", "cidm-no-ewa", "cidm-code-psi",
                              "cidm-tokens-only", "cidm-no-r1"])
    assert groups == [["cidm", "cidm-no-ewa", "cidm-code-psi", "cidm-tokens-only"], ["lora-m", "lora-c"],
                      ["finetune"], ["cidm-no-r1"]]
    from cidm.methods import METHODS, compared_methods

    assert set(METHODS) - set(compared_methods()) == {"cidm-tokens-only"}  # the diagnostic runs only when named
    results = run_methods_bench(tmp_path, ["lora-m", "lora-c"], tasks=2, steps=40, prompts=1, images=1, gen_steps=3)
    assert (tmp_path / "lora-m" / "library" / "library.json").is_file() and not (tmp_path / "lora-c").exists()
    m, c = results["methods"]["lora-m"], results["methods"]["lora-c"]
    assert m["learn_seconds"] == c["learn_seconds"] > 0
    first = m["ia"]["medic"][1]
    assert c["ia"]["medic"][1] == first  # one LoRA: its average and its composite are the same model
    # two: averaged weights differ from averaged predictions (a few training steps: small LoRAs, small differences)
    assert abs(c["ia"]["medic"][2] - m["ia"]["medic"][2]) > 1e-3


def test_a_methods_run_stopped_early_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    from cidm.bench import methods as bench

    real, calls = bench.run_sequence, []

    def stop_at_second_group(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_sequence", stop_at_second_group)
    with pytest.raises(KeyboardInterrupt):
        bench.run_methods_bench(tmp_path, ["lora-m", "finetune"], tasks=1, steps=2, prompts=1, images=1, gen_steps=3)
    kept = bench.load_results(tmp_path / "results.json")
    assert list(kept["methods"]) == ["lora-m"] and "| lora-m |" in (tmp_path / "results.md").read_text()


def test_tuning_picks_the_weight_with_the_best_average_ia_on_the_tuning_sequence(tmp_path):
    from cidm.bench.tuning import run_tuning

    report = run_tuning(tmp_path, ["ewc"], grid=(0.1, 10.0), steps=2, prompts=1, images=1, gen_steps=3)
    spec = json.loads((EXAMPLES / "concepts.json").read_text())
    assert report["protocol"]["tasks"] == spec["tuning_sequence"]
    assert not set(spec["tuning_sequence"]) & set(spec["standard_sequence"])
    trials = report["trials"]
    assert [t["settings"] for t in trials] == [{"ewc_lambda": 0.1}, {"ewc_lambda": 10.0}]
    best = max(trials, key=lambda t: t["ia"])
    assert report["chosen"] == {"ewc": best["settings"]}
    text = (tmp_path / "results.md").read_text()
    assert "ewc_lambda=0.1" in text and "ewc_lambda=10" in text and "yes" in text
    with pytest.raises(ValueError, match="no weight to tune|has a weight"):
        run_tuning(tmp_path / "none", ["lora-m"])


def test_tuning_tries_each_methods_own_grid_and_text_settings(tmp_path, monkeypatch):
    from cidm.bench import tuning as bench

    tried = []

    def fake_sequence(out, methods, spec, order, protocol, evaluator, base_model=None, overrides=None, label=None):
        tried.append((label, overrides))
        score = {n: {t: 10.0 * overrides.get("gamma1", 0.005) for t in range(1, len(order) + 1)} for n in order}
        return {methods[0]: {"ia": score, "ta": score}}

    monkeypatch.setattr(bench, "run_sequence", fake_sequence)
    both = {"r1_form": "subspace", "gamma1": 0.2}
    report = bench.run_tuning(tmp_path, ["cidm"], extra={"cidm": [{"r1_reduction": "mean"}, both]})
    assert [o for _, o in tried] == [{"gamma1": 0.001}, {"gamma1": 0.01}, {"gamma1": 0.1}, {"r1_reduction": "mean"},
                                     both]
    assert tried[3][0] == "cidm_r1_reduction=mean"
    assert report["chosen"] == {"cidm": both}  # the best trial, every setting of it, even an extra one
    text = (tmp_path / "results.md").read_text()
    assert "r1_reduction=mean" in text and "| cidm | r1_form=subspace, gamma1=0.2 | 2.0 |" in text


def test_a_trial_may_set_how_every_method_generates_and_the_library_learns_with_shared_start(tmp_path, monkeypatch):
    from cidm.bench import methods as bench
    from cidm.bench.results import load_concept_set, make_protocol

    asked = []
    real = bench.generate_set

    def recording(studio, prompts, n_images, steps, guidance, seed=0, **settings):
        asked.append(settings)
        return real(studio, prompts, n_images, steps, guidance, seed, **settings)

    monkeypatch.setattr(bench, "generate_set", recording)
    spec = load_concept_set(EXAMPLES)
    order = spec["tuning_sequence"][:2]
    protocol = make_protocol(order, 2, 1, 1, 0, 2, 5.0)
    runs = bench.run_sequence(tmp_path, ["cidm"], spec, order, protocol, None,
                              overrides={"psi": "sharp", "lora_start": "shared", "gamma1": 0.01})
    assert [a["psi"] for a in asked] == ["sharp"] * 3 and all(a["merge"] == "ewa" for a in asked)
    assert runs["cidm"]["settings"]["psi"] == "sharp" and runs["cidm"]["settings"]["lora_start"] == "shared"
    library = json.loads((tmp_path / "cidm" / "library" / "library.json").read_text())
    assert "shared" in json.dumps(library)  # the second task learned with the start it was given


def test_quick_benchmark_writes_finite_tables_and_plots(tmp_path):
    from cidm.bench.methods import run_methods_bench

    results = run_methods_bench(tmp_path, ["cidm", "lora-m"], tasks=2, steps=3, prompts=1, images=1, gen_steps=5)
    for name in ("results.md", "results.json", "ia_over_tasks.png", "ia_heatmap_cidm.png", "ia_heatmap_lora-m.png"):
        assert (tmp_path / name).is_file(), name
    for r in results["methods"].values():
        values = [v for per in (r["ia"], r["ta"]) for c in per.values() for v in c.values()]
        assert len(values) == 2 * 3 and all(-100.0 <= v <= 250.0 and v == v for v in values)
    text = (tmp_path / "results.md").read_text()
    assert "| cidm |" in text and "Avg" in text and "Forgetting" in text
    fresh = [float(v) for v in text.split("### Plasticity")[1].split("| cidm |")[1].split("\n")[0].split("|")[:-1]]
    ia = results["methods"]["cidm"]["ia"]
    assert fresh == pytest.approx([round(ia["medic"][1], 1), round(ia["bolt"][2], 1),
                                   round((ia["medic"][1] + ia["bolt"][2]) / 2, 1)], abs=0.051)
    from cidm.bench.results import load_results, results_markdown

    again = load_results(tmp_path / "results.json")  # what the app's method comparison reads back
    assert results_markdown(again, again["protocol"]["tasks"]) == text

    # the same run in two processes, one training group each: the same numbers, merged in the methods' order
    parallel = run_methods_bench(tmp_path / "parallel", ["cidm", "lora-m"], tasks=2, steps=3, prompts=1, images=1,
                                 gen_steps=5, workers=2)
    assert list(parallel["methods"]) == ["cidm", "lora-m"] and parallel["run"]["workers"] == 2
    for m, r in results["methods"].items():
        for metric in ("ia", "ta"):
            for n, row in r[metric].items():
                assert parallel["methods"][m][metric][n] == pytest.approx(row, abs=1e-4), (m, metric, n)
    assert "processes" in (tmp_path / "parallel" / "results.md").read_text()

    import app

    tables, figure = app.methods_view(str(tmp_path / "results.json"))
    assert tables == text and figure is not None
    import gradio as gr

    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "results"}')
    with pytest.raises(gr.Error, match="not a `cidm bench` results.json"):
        app.methods_view(str(bad))


def test_method_runs_made_apart_merge_into_the_same_table(tmp_path):
    from cidm.bench.methods import merge_results, run_methods_bench

    kw = dict(tasks=2, steps=3, prompts=1, images=1, gen_steps=5)
    joint = run_methods_bench(tmp_path / "joint", ["cidm", "lora-m"], **kw)
    run_methods_bench(tmp_path / "a", ["cidm"], **kw)
    run_methods_bench(tmp_path / "b", ["lora-m"], **kw)
    merged = merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for m in ("cidm", "lora-m"):
        assert merged["methods"][m]["ia"] == joint["methods"][m]["ia"]  # deterministic, whichever process ran it
    assert (tmp_path / "merged" / "ia_heatmap_lora-m.png").is_file() and (tmp_path / "merged" / "results.md").is_file()
    assert "Run again" not in (tmp_path / "merged" / "results.md").read_text()
    run = {"workers": 2, "threads_each": 1, "wall_seconds": 90.0, "rerun": {"methods": ["lora-m"]}}
    merge_results([tmp_path / "a", tmp_path / "b"], tmp_path / "rerun", run=run)
    text = (tmp_path / "rerun" / "results.md").read_text()
    assert "took 1.5 min in 2 processes" in text and "with that run's times: lora-m." in text
    import pytest

    with pytest.raises(ValueError, match="repeats method"):
        merge_results([tmp_path / "a", tmp_path / "joint"], tmp_path / "bad")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A new concept of the world's family (procedural: never shipped, never tuned on), learned as `cidm learn` does
    with the base's defaults but fewer steps; its references beside every shipped object's, and the evaluator."""
    from cidm.metrics import Evaluator
    from cidm.studio import Studio

    name = "random-object-1001"
    spec = C.spec(name)
    studio = Studio(tmp_path_factory.mktemp("lib"), base_model=str(MODEL))
    studio.record_forgetting = False
    refs = {n: [Image.fromarray(a) for a in C.reference_images(n)[0]] for n in (name, *C.OBJECTS)}
    studio.learn(name, refs[name], spec.class_word, spec.kind, steps=LEARN_STEPS)
    return studio, spec, refs, Evaluator(studio.info.evaluator)


def test_a_short_learning_run_gives_a_concept_the_evaluator_identifies(learned):
    """The learned concept comes back as itself: the evaluator places its images nearest its own references among
    every shipped object, far above chance, and far more often than the base's images of its class word."""
    from cidm.metrics import identity_confusion

    studio, spec, refs, evaluator = learned
    name = spec.name
    prompts = list(spec.eval_prompts[:8])
    learned_images = studio.generate(prompts, seed=0)
    base = studio.generate([p.replace(f"<{name}>", spec.class_word) for p in prompts], seed=0)
    confusion = identity_confusion(evaluator, {"learned": learned_images, "base": base}, refs)
    chance = 1 / len(refs)
    assert confusion["learned"][name] >= IDENTIFIED, confusion["learned"]
    assert confusion["learned"][name] >= confusion["base"][name] + 0.25, (confusion["learned"], confusion["base"])
    assert IDENTIFIED > 4 * chance


def test_a_learned_concept_in_a_stock_diffusers_pipeline_is_identified(learned, monkeypatch):
    """What the card promises: its snippet runs as written, and a stock `StableDiffusionPipeline` with the concept's
    LoRA and textual-inversion file (no CIDM code) makes images the evaluator identifies as the concept, far above
    chance and far more often than the same pipeline's images of the class word before it loads them."""
    import re

    from diffusers import StableDiffusionPipeline

    from cidm.metrics import identity_confusion

    studio, spec, refs, evaluator = learned
    name, folder = spec.name, studio.library.concept_dir(spec.name)
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(folder.parent)  # the snippet's `folder` is the concept's folder, relative
    scope = {}
    exec(snippet.replace("num_inference_steps=25", "num_inference_steps=3"), scope)
    assert scope["image"].size == (64, 64)

    plain = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    prompts = list(spec.eval_prompts[:8])

    def generate(prompts):
        return plain(prompts, num_inference_steps=25, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(0)).images

    base = generate([p.replace(f"<{name}>", spec.class_word) for p in prompts])
    plain.load_lora_weights(str(folder))
    plain.load_textual_inversion(str(folder / "learned_embeds.safetensors"), token=f"<{name}>")
    confusion = identity_confusion(evaluator, {"plain": generate(prompts), "base": base}, refs)
    assert confusion["plain"][name] >= PLAIN_IDENTIFIED, confusion["plain"]
    assert confusion["plain"][name] >= confusion["base"][name] + 0.25, (confusion["plain"], confusion["base"])


def test_the_toy_world_trains_from_scratch_into_a_folder_the_studio_loads(tmp_path):
    """`python -m cidm toyworld train` in miniature (a few steps a stage): every stage runs, in order, and leaves a
    diffusers folder with its evaluator that `load_base` and `load_evaluator` read; run again, it has nothing to do."""
    from transformers import VisionTextDualEncoderModel

    from cidm.toyworld.train import ToyTrainConfig, train_all

    cfg = ToyTrainConfig(out=str(tmp_path), vae_steps=2, vae_batch=4, clip_steps=2, clip_batch=16, n_latents=64,
                         unet_steps=2, unet_batch=4, eval_every=2, eval_prompts=8, ema_start=0)
    (tmp_path / "state").mkdir()  # a run dir from the first version: its ViT evaluator's state is not resumed
    old_state = {"modules": {"clip": {}, "mask_head": {}}, "optimizer": {}, "step": 2900}
    torch.save(old_state, tmp_path / "state" / "evaluator.pt")
    folder = train_all(cfg)
    info = json.loads((folder / "training.json").read_text())
    assert info["evaluator"]["steps"] == 2 and info["evaluator"]["image_tower"] == "glyph-cnn"
    assert info["unet"]["steps"] == 2 and (folder / "model_index.json").is_file()
    pipe, base = models.load_base(str(folder), "cpu")
    assert base.evaluator == str((folder / "evaluator").resolve())
    evaluator, _ = models.load_evaluator(base.evaluator, "cpu")
    assert isinstance(evaluator, VisionTextDualEncoderModel)
    image = pipe("a photo of a red star", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    log_lines = (tmp_path / "train_log.jsonl").read_text().count("\n")
    train_all(cfg)  # every stage done: the second run only reloads
    assert '"resumed_at"' in (tmp_path / "train_log.jsonl").read_text().splitlines()[-1]
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == log_lines + 1

    # the evaluator trained on: the shipped UNet's score is read again by it before any later UNet is compared
    train_all(dataclasses.replace(cfg, clip_steps=3, unet_steps=4))
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    rescored = [r for r in records if "rescored" in r]
    assert [(r["rescored"], r["was"], r["evaluator"]) for r in rescored] == [(2, "glyph-cnn-2", "glyph-cnn-3")]
    best = torch.load(tmp_path / "state" / "unet.pt", weights_only=False)["extra"]["best"]
    assert best["evaluator"] == "glyph-cnn-3" and best["score"] >= rescored[0]["score"]


def test_cidms_default_learns_a_lora_for_every_task_where_the_printed_r1_holds_the_second_at_zero(tmp_path):
    """On the shipped base, R1 as printed (Σ|A_i A_gᵀ|) keeps the second task's LoRA at ~0, so CIDM would learn with
    its tokens alone; the chosen settings (subspace R1, a start from R2's shared knowledge) learn a real one."""
    from cidm.studio import Studio

    spec = json.loads((EXAMPLES / "concepts.json").read_text())

    def second_lora_norm(method: str) -> tuple[float, float]:
        studio = Studio(tmp_path / method, method=method)
        studio.record_forgetting = False
        for name in spec["tuning_sequence"][:2]:
            c = spec["concepts"][name]
            studio.learn(name, [EXAMPLES / f for f in c["images"]], c["class_word"], c["kind"], steps=40)
        return tuple(float(sum((lora.delta(m) ** 2).sum() for m in lora.modules) ** 0.5)
                     for lora in studio.loras.values())

    first, second = second_lora_norm("cidm")
    assert second > 0.2 * first > 0
    first, second = second_lora_norm("cidm-paper")
    assert second < 0.02 * first
