"""Every method of the benchmark learns two tasks and generates; each leaves the base model exactly as it was."""

import json

import numpy as np
import pytest
import torch

from cidm.methods import METHODS
from cidm.studio import Studio
from test_core import base, learn  # noqa: F401  (module fixture, helper)


def fresh(base, path, method):
    from conftest import make_tiny_pipeline

    return Studio(path, pipe=make_tiny_pipeline(), info=base[1], method=method)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_two_tasks_and_keeps_the_base_weights(base, tmp_path, method):
    studio = fresh(base, tmp_path / method, method)
    studio.record_forgetting = False
    before = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items()}
    learn(studio, "medic", steps=3)
    learn(studio, "bolt", steps=3)
    after = studio.pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    image = studio.generate("a photo of a <medic> and a <bolt>", steps=2)[0]
    assert image.size == (64, 64)
    assert studio.library.manifest["method"] == method


def test_finetune_starts_each_task_from_the_previous_lora(base, tmp_path):
    studio = fresh(base, tmp_path / "ft", "finetune")
    studio.record_forgetting = False
    learn(studio, "medic", steps=3)
    learn(studio, "bolt", steps=1, lr_lora=0.0)  # a step at rate 0: the new LoRA is exactly the previous one
    a, b = studio.loras["medic"], studio.loras["bolt"]
    assert all(torch.equal(a.up[m], b.up[m]) and torch.equal(a.down[m], b.down[m]) for m in a.up)


def test_c_lora_trains_only_key_and_value_projections_and_random_tokens(base, tmp_path):
    studio = fresh(base, tmp_path / "cl", "c-lora")
    studio.record_forgetting = False
    learn(studio, "medic", steps=2)
    assert {m.rsplit(".", 1)[-1] for m in studio.loras["medic"].modules} == {"to_k", "to_v"}
    rows = studio.tokens.rows("medic")
    assert rows.norm(dim=-1).max() < 0.5  # every slot random N(0, σ²), none copied from a class word


def test_merge_modes_weigh_tasks_as_their_methods_say(base, tmp_path):
    from cidm.generate import GenerateConfig, layer_weights

    studio = fresh(base, tmp_path / "m", "lora-m")
    studio.record_forgetting = False
    learn(studio, "medic", steps=1)
    learn(studio, "bolt", steps=1)
    w = {m: layer_weights(studio.tokens, studio.loras, "a <bolt>", GenerateConfig(merge=m))
         for m in ("mean", "sum", "last")}
    assert np.allclose(w["mean"].numpy(), 0.5) and np.allclose(w["sum"].numpy(), 1.0)
    assert w["last"][:, 1].eq(1).all() and w["last"][:, 0].eq(0).all()
    with pytest.raises(ValueError, match="merge must be one of"):
        layer_weights(studio.tokens, studio.loras, "a", GenerateConfig(merge="magic"))


def test_lora_composite_averages_each_loras_own_prediction(base, tmp_path):
    from cidm.generate import GenerateConfig, generate

    studio = fresh(base, tmp_path / "c", "lora-c")
    studio.record_forgetting = False
    learn(studio, "medic", steps=3, lr_lora=0.05)  # a LoRA large enough to change the pixels
    learn(studio, "bolt", steps=3, lr_lora=0.05)
    prompt, medic = "a photo of a <medic> on grass", studio.loras["medic"]

    def image(loras, merge):
        config = GenerateConfig(steps=3, merge=merge, num_images=2)
        return np.stack([np.asarray(i, np.int16) for i in generate(studio.pipe, studio.tokens, loras, prompt,
                                                                    config=config)])

    # two copies of one LoRA: the average of two equal predictions is that LoRA alone, at weight 1 (not 2, not 1/2)
    twice = image({"medic": medic, "again": medic}, "composite")
    assert np.abs(twice - image({"medic": medic}, "last")).max() <= 1
    both = image(dict(studio.loras), "composite")
    assert np.abs(both - twice).max() > 8  # bolt's copy counts


def test_tokens_only_diagnostic_generates_exactly_as_with_no_lora(base, tmp_path):
    from cidm.generate import GenerateConfig, generate

    studio = fresh(base, tmp_path / "t", "cidm")
    studio.record_forgetting = False
    learn(studio, "medic", steps=3, lr_lora=0.05)  # a LoRA large enough to change the pixels
    prompt = "a photo of a <medic> on grass"
    tokens_only = np.asarray(studio.generate(prompt, steps=3, merge="none")[0])
    no_lora = np.asarray(generate(studio.pipe, studio.tokens, {}, prompt, config=GenerateConfig(steps=3))[0])
    with_lora = np.asarray(studio.generate(prompt, steps=3)[0])
    np.testing.assert_array_equal(tokens_only, no_lora)
    assert np.abs(with_lora.astype(int) - tokens_only).max() > 0


def test_a_base_folders_learning_settings_apply_unless_a_task_overrides_them(base, tmp_path):
    import dataclasses
    import json

    from cidm.models import find_task_defaults

    assert find_task_defaults(str(tmp_path)) == {}
    (tmp_path / "cidm_task_defaults.json").write_text(json.dumps({"lr_lora": 0.002, "_comment": "why"}))
    assert find_task_defaults(str(tmp_path)) == {"lr_lora": 0.002}
    from conftest import make_tiny_pipeline

    info = dataclasses.replace(base[1], task_defaults={"lr_lora": 0.002})
    studio = Studio(tmp_path / "lib", pipe=make_tiny_pipeline(), info=info, method="cidm")
    studio.record_forgetting = False
    learn(studio, "medic", steps=1)
    learn(studio, "bolt", steps=1, lr_lora=0.003)
    concepts = studio.library.manifest["concepts"]
    assert concepts["medic"]["training"]["lr_lora"] == 0.002 and concepts["bolt"]["training"]["lr_lora"] == 0.003


def test_a_library_keeps_its_method(base, tmp_path):
    from cidm.library import LibraryError

    studio = fresh(base, tmp_path / "k", "lora-m")
    studio.record_forgetting = False
    learn(studio, "medic", steps=1)
    with pytest.raises(LibraryError, match="learned with method 'lora-m'"):
        fresh(base, tmp_path / "k", "cidm")
    assert fresh(base, tmp_path / "k", None).method.name == "lora-m"


def test_ewc_stores_a_cumulative_fisher_and_pulls_towards_the_previous_lora(base, tmp_path):
    from cidm.methods.ewc import read_fisher

    studio = fresh(base, tmp_path / "ewc", "ewc")
    studio.record_forgetting = False
    learn(studio, "medic", steps=2)
    first = read_fisher(studio.library, "medic")
    assert first and all((v >= 0).all() for v in first.values()) and any(v.sum() > 0 for v in first.values())
    learn(studio, "bolt", steps=2)
    second = read_fisher(studio.library, "bolt")
    assert all((second[k] >= first[k] - 1e-12).all() for k in first)  # cumulative


def distilled_beside_finetuning(base, tmp_path, method):
    """Two tasks learned with finetuning and with a distillation method; asserts the distillation changed task 2."""
    plain, other = fresh(base, tmp_path / "ft", "finetune"), fresh(base, tmp_path / method, method)
    for s in (plain, other):
        s.record_forgetting = False
        learn(s, "medic", steps=2)
        learn(s, "bolt", steps=3)
    a, b = plain.loras["bolt"], other.loras["bolt"]
    assert any(not torch.equal(a.up[m], b.up[m]) for m in a.up)  # the distillation term changed the updates
    return plain, other


def test_lwf_distillation_leaves_adapters_enabled_and_changes_training(base, tmp_path):
    distilled_beside_finetuning(base, tmp_path, "lwf")


def test_lfs_distils_from_the_teacher_and_generates_from_each_concepts_vision_context(base, tmp_path):
    plain, lfs = distilled_beside_finetuning(base, tmp_path, "lfs")
    assert all((lfs.library.concept_dir(n) / "context.png").exists() for n in ("medic", "bolt"))
    assert not (plain.library.concept_dir("medic") / "context.png").exists()
    # a prompt naming <medic> starts from medic's vision context: the less it is re-noised, the closer it stays
    context = np.asarray(lfs.method.contexts["medic"], float)
    near = np.asarray(lfs.generate("a photo of a <medic>", steps=10, seed=1, context_strength=0.1)[0], float)
    far = np.asarray(lfs.generate("a photo of a <medic>", steps=10, seed=1, context_strength=1.0)[0], float)
    assert np.abs(near - context).mean() < np.abs(far - context).mean()
    assert set(Studio(lfs.library.root, pipe=lfs.pipe, info=base[1]).method.contexts) == {"medic", "bolt"}


@pytest.mark.parametrize("method", ["lwf", "lfs"])
def test_teachers_prompt_an_earlier_style_with_a_style_template(base, tmp_path, method):
    studio = fresh(base, tmp_path / method, method)
    studio.record_forgetting = False
    learn(studio, "pixelart", steps=1)  # a style concept first
    prompts, encode = [], studio.tokens.encode

    def recording(batch):
        prompts.extend(batch)
        return encode(batch)

    studio.tokens.encode = recording
    settings = {"lfs_refresh": 1, "lfs_trajectory_steps": 2} if method == "lfs" else {}
    learn(studio, "medic", steps=2, **settings)  # the teacher's second trajectory is the earlier concept's
    assert "a picture in <pixelart> style" in prompts
    assert not any("a photo of a <pixelart>" in p for p in prompts)


def test_the_forgetting_record_costs_a_fixed_budget_per_task_and_carries_the_other_cells(base, tmp_path):
    from cidm.plots import forgetting_grid

    studio = fresh(base, tmp_path / "lib", "cidm")
    studio.forgetting_budget = 2  # the new concept and the one measured longest ago
    studio.card_samples = 0  # only the record generates here
    generated = []
    real_generate = studio.generate
    studio.generate = lambda prompt, **kw: generated.append(len(prompt)) or real_generate(prompt, **kw)
    for name in ("medic", "bolt", "donut", "lucky"):
        learn(studio, name, steps=1)
    record = studio.library.root / "forgetting"
    regenerated = [json.loads((record / f"after-{t:02d}" / "scores.json").read_text())["regenerated"]
                   for t in (1, 2, 3, 4)]
    assert regenerated == [["medic"], ["medic", "bolt"], ["donut", "medic"], ["lucky", "bolt"]]
    assert generated == [1, 1, 2, 2, 2, 2, 2, 2]  # one batch per seed, never more than the budget
    assert sorted(p.name for p in (record / "after-04").glob("*.png")) == \
        ["bolt-0.png", "bolt-1.png", "lucky-0.png", "lucky-1.png"]
    _, measured_at = studio.library.forgetting_record()
    assert measured_at[4] == {"medic": 3, "bolt": 4, "donut": 3, "lucky": 4}
    grid = forgetting_grid(studio.library.root, studio.names, [1, 2, 3, 4], measured_at=measured_at)
    carried = grid.getpixel((110 + 3 * 96 + 48, 22 + 48))  # medic after task 4: its task-3 image, faded
    fresh_cell = grid.getpixel((110 + 2 * 96 + 48, 22 + 48))  # medic after task 3, as generated
    assert carried != fresh_cell and carried != (255, 255, 255)

    # a scores file from a hostile Hub library is skipped, never trusted
    (record / "after-09").mkdir()
    (record / "after-09" / "scores.json").write_text(json.dumps({"after_task": "../x", "regenerated": 5}))
    (record / "after-07").mkdir()
    (record / "after-07" / "scores.json").write_text(json.dumps({"after_task": 8, "ia": {"medic": "x"}}))
    assert sorted(studio.library.forgetting_record()[1]) == [1, 2, 3, 4]
