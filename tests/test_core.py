"""CIDM core: layer-wise tokens, LoRA per task, R1 / R2, EWA, the library, learning and generating."""

import json

import numpy as np
import pytest
import torch

from cidm import models
from cidm.ewa import elastic_weights, ewa_weights, merged
from cidm.library import Library, LibraryError, validate_name
from cidm.lora import LoRAWeights
from cidm.losses import TaskSharedKnowledge, orthogonal_subspace_loss
from cidm.methods import METHODS
from cidm.studio import Studio
from cidm.toyworld import concepts as C

STEPS = 12


def learn(studio, name, steps=STEPS, **kw):
    images, captions = C.reference_images(name)
    spec = C.spec(name)
    return studio.learn(name, images, spec.class_word, spec.kind, captions=captions, steps=steps, batch_size=2,
                        **kw)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return models.load_base(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def studio(base, tmp_path_factory):
    """A library with three concepts learned one after another (two objects, one style)."""
    pipe, info = base
    studio = Studio(tmp_path_factory.mktemp("lib"), pipe=pipe, info=info)
    for name in ("medic", "bolt", "pixelart"):
        learn(studio, name)
    return studio


def fresh_studio(base, path):
    from conftest import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return Studio(path, pipe=pipe, info=base[1])


def image(studio, prompt, seed=0, **kw):
    return np.asarray(studio.generate(prompt, steps=3, seed=seed, **kw)[0], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# learning


def test_only_the_new_embedding_rows_change(base, tmp_path):
    pipe, info = base
    untrained = fresh_studio(base, tmp_path / "untrained")
    learn(untrained, "medic", steps=1, seed=0, lr_embedding=0.0)
    init = untrained.tokens.rows("medic").detach().clone()  # the initial rows, as learning starts (rate 0)
    studio = fresh_studio(base, tmp_path / "lib")
    table_before = studio.tokens.embedding.base.weight.detach().clone()
    learn(studio, "medic", steps=5, seed=0)
    assert torch.equal(studio.tokens.embedding.base.weight, table_before)
    rows = studio.tokens.rows("medic")
    assert rows.shape == (2 * info.num_cross_attn_layers, 32)
    assert not torch.allclose(rows, init)  # the concept rows did learn


def test_concepts_start_from_different_random_tokens(studio):
    rows = [studio.tokens.rows(n)[0] for n in studio.names]  # slot 0, layer 0 of each concept
    assert not torch.allclose(rows[0], rows[1], atol=1e-3)


def test_learning_is_deterministic_for_a_seed(base, tmp_path):
    a = fresh_studio(base, tmp_path / "a")
    b = fresh_studio(base, tmp_path / "b")
    learn(a, "medic", steps=4, seed=3)
    learn(b, "medic", steps=4, seed=3)
    assert torch.equal(a.tokens.rows("medic"), b.tokens.rows("medic"))
    la, lb = a.loras["medic"], b.loras["medic"]
    assert all(torch.equal(la.up[m], lb.up[m]) for m in la.up)


def test_previews_while_learning_leave_the_learned_concept_bit_identical(base, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler

    plain, watched = fresh_studio(base, tmp_path / "plain"), fresh_studio(base, tmp_path / "watched")
    for s in (plain, watched):  # an ancestral sampler: a preview then draws from the global RNG, as training does
        s.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(s.pipe.scheduler.config)
        s.record_forgetting = False
    state = torch.get_rng_state()
    plain.generate("a photo of a red star", steps=2)
    assert not torch.equal(state, torch.get_rng_state())  # not vacuous: unguarded, a preview would shift training
    shown = []
    learn(plain, "medic", steps=5, seed=3)
    learn(watched, "medic", steps=5, seed=3, preview=lambda step, images: shown.append((step, images)),
          preview_every=2)
    assert [step for step, _ in shown] == [2, 4, 5] and shown[0][1][0].size == (64, 64)  # every 2 and the last
    assert torch.equal(plain.tokens.rows("medic"), watched.tokens.rows("medic"))
    a, b = plain.loras["medic"], watched.loras["medic"]
    assert all(torch.equal(a.up[m], b.up[m]) and torch.equal(a.down[m], b.down[m]) for m in a.up)
    assert watched.pipe.unet.training is False and not getattr(watched.pipe.unet, "peft_config", None)


def test_the_last_preview_draws_the_concept_as_learned(base, tmp_path):
    from cidm.train import PREVIEW_STEPS

    studio = fresh_studio(base, tmp_path / "lib")
    studio.record_forgetting = False
    shown = []
    learn(studio, "medic", steps=3, lr_lora=0.05, preview=lambda step, images: shown.append(images[0]))
    prompt = studio.probe_prompt("medic")
    learned = np.asarray(studio.generate(prompt, steps=PREVIEW_STEPS, merge="last")[0], dtype=np.float32)
    tokens_only = np.asarray(studio.generate(prompt, steps=PREVIEW_STEPS, merge="none")[0], dtype=np.float32)
    assert np.abs(learned - tokens_only).mean() > 1  # the LoRA shows in the image
    assert np.abs(np.asarray(shown[-1], dtype=np.float32) - learned).max() <= 2  # live adapter vs merged weights
    with pytest.raises(ValueError, match="preview_every"):
        learn(studio, "bolt", steps=1, preview=print, preview_every=0)


def test_library_files_and_manifest(studio):
    lib = studio.library
    assert lib.names == ["medic", "bolt", "pixelart"]
    manifest = json.loads((lib.root / "library.json").read_text())
    assert manifest["method"] == "cidm" and manifest["base_model"]["n_layers"] == 7
    rec = manifest["concepts"]["pixelart"]
    assert rec["kind"] == "style" and rec["class_word"] == "style" and rec["task"] == 3
    chosen = METHODS["cidm"]
    assert rec["training"]["gamma1"] == chosen.gamma1 and rec["training"]["gamma2"] == chosen.gamma2 == 1.0
    folder = lib.root / "bolt"
    for f in ("pytorch_lora_weights.safetensors", "tokens.safetensors", "README.md", "images/0.png"):
        assert (folder / f).is_file(), f
    card = (folder / "README.md").read_text()
    assert "cidm" in card and "text-to-image" in card and "<bolt>" in card
    assert lib.task_shared_file.is_file()


def test_lora_file_loads_in_a_plain_diffusers_pipeline_and_changes_output(studio, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe("a photo of a square", num_inference_steps=3, generator=g, output_type="np").images

    before = run()
    pipe.load_lora_weights(str(studio.library.root / "medic"), adapter_name="medic")
    after = run()
    assert not np.allclose(before, after, atol=1e-6)


def test_reloaded_library_generates_identical_images(studio, base, tmp_path):
    again = fresh_studio(base, studio.library.root)
    assert again.names == studio.names
    a = image(studio, "a photo of a <medic> in <pixelart> style")
    b = image(again, "a photo of a <medic> in <pixelart> style")
    np.testing.assert_array_equal(a, b)


def test_concepts_change_the_image(studio):
    plain = image(studio, "a photo of a square on a beach")
    concept = image(studio, "a photo of a <medic> on a beach")
    assert np.abs(plain - concept).max() > 0


# --------------------------------------------------------------------------------------------------------------
# R1, R2


def lora(up, down, scale=1.0):
    return LoRAWeights({"m": up}, {"m": down}, scale)


def test_r1_subspace_form_is_zero_for_orthogonal_subspaces_and_positive_otherwise():
    eye = torch.eye(8)
    new = lora(eye[:, :4], torch.randn(4, 5))
    orthogonal = lora(eye[:, 4:], torch.randn(4, 5))
    overlapping = lora(eye[:, 2:6], torch.randn(4, 5))  # shares two basis vectors with `new`
    assert orthogonal_subspace_loss(new, [orthogonal], form="subspace").item() == 0.0
    assert orthogonal_subspace_loss(new, [overlapping], form="subspace").item() == pytest.approx(2.0)
    assert orthogonal_subspace_loss(new, [overlapping], "mean", "subspace").item() == pytest.approx(2.0 / 16)


def test_r1_literal_form_is_the_printed_formula_and_ignores_orthogonality():
    eye = torch.eye(8)
    new = lora(eye[:, :4], torch.randn(4, 5))
    orthogonal = lora(eye[:, 4:], torch.randn(4, 5))
    # |A_i A_gᵀ| pairs column c of A_i with column c of A_g: four ones although the subspaces are orthogonal
    assert orthogonal_subspace_loss(new, [orthogonal]).item() == pytest.approx(4.0)
    assert orthogonal_subspace_loss(new, [orthogonal], "mean").item() == pytest.approx(4.0 / 64)
    zero = lora(torch.zeros(8, 4), torch.randn(4, 5))
    assert orthogonal_subspace_loss(zero, [orthogonal]).item() == 0.0


def test_r2_factored_form_equals_the_dense_formula():
    g = torch.Generator().manual_seed(0)
    first = lora(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5)
    second = lora(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5)
    shared = TaskSharedKnowledge(rank=3)
    shared.initialise("a", first, generator=g)
    scale = (first.delta("m") ** 2).sum().item()
    assert shared.task_shared_loss("a", first).item() == pytest.approx(0.0, abs=1e-6 * scale)  # H_1 W_* = ΔW_1
    shared.add_task("b")
    with torch.no_grad():
        for p, _ in shared.factors("b").values():
            p.normal_(generator=g)
    dense = ((second.delta("m") - shared.shared_delta("b")["m"]) ** 2).sum()
    assert shared.task_shared_loss("b", second).item() == pytest.approx(dense.item(), rel=1e-5)


def test_a_task_started_from_the_shared_knowledge_begins_at_the_mean_past_h_w():
    from cidm.methods.cidm import start_lora_at

    g = torch.Generator().manual_seed(3)
    shapes = MIXED_SHAPES
    past = [random_lora(shapes, g) for _ in range(2)]
    shared = TaskSharedKnowledge(rank=3)
    shared.initialise("a", past[0], generator=g)
    shared.add_task("b")
    with torch.no_grad():
        for p in [*(p for p, _ in shared.factors("b").values()), *shared.U.values()]:  # W_* moved on since task a: U no longer orthonormal
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    shared.add_task("c", start="mean")
    mean = {m: (shared.shared_delta("a")[m] + shared.shared_delta("b")[m]) / 2 for m in shapes}
    for m in shapes:
        assert torch.allclose(shared.shared_delta("c")[m], mean[m], atol=1e-4)
    new = random_lora(shapes, g)  # rank 2 < the target's rank 3: the best rank-2 approximation
    start_lora_at(new, mean)
    for m in shapes:
        u, s, vh = torch.linalg.svd(mean[m])
        assert torch.allclose(new.delta(m), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4)
    zero = random_lora(shapes, g)
    before = {m: w.clone() for m, w in zero.down.items()}
    start_lora_at(zero, {m: torch.zeros(a, b) for m, (a, b) in shapes.items()})
    for m in shapes:  # nothing to start from: a fresh LoRA (A = 0, B kept), which can still learn
        assert zero.delta(m).abs().max() == 0 and torch.equal(zero.down[m], before[m])
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        shared.add_task("d", start="average")


def test_a_task_started_from_the_previous_task_begins_at_its_lora_and_leaves_the_past_as_it_was():
    from types import SimpleNamespace

    from cidm.methods.cidm import CIDM

    g = torch.Generator().manual_seed(5)
    past = {"a": random_lora(MIXED_SHAPES, g), "b": random_lora(MIXED_SHAPES, g)}
    kept = {n: {m: l.delta(m).clone() for m in MIXED_SHAPES} for n, l in past.items()}
    for start in ("previous", "zero"):
        current = random_lora(MIXED_SHAPES, g)
        fresh = {m: current.delta(m).clone() for m in MIXED_SHAPES}
        task = SimpleNamespace(config=SimpleNamespace(name="c"), past=past, current=current)
        CIDM("t", "", lora_start=start, use_r2=False).before_task(task)
        for m in MIXED_SHAPES:  # task g-1's ΔW exactly (rank 2 into rank 2), or untouched from θ0
            assert torch.allclose(current.delta(m), kept["b"][m] if start == "previous" else fresh[m], atol=1e-5)
            assert all(torch.equal(past[n].delta(m), kept[n][m]) for n in past)
    task = SimpleNamespace(config=SimpleNamespace(name="c"), past=past, current=random_lora(MIXED_SHAPES, g))
    with pytest.raises(ValueError, match="'zero', 'shared' or 'previous'"):
        CIDM("t", "", lora_start="last").before_task(task)


MIXED_SHAPES = {"q1": (6, 5), "q2": (6, 5), "k1": (6, 9), "o1": (4, 6)}  # modules of three shapes, two alike


def random_lora(shapes: dict, g: torch.Generator, rank: int = 2) -> LoRAWeights:
    return LoRAWeights({m: torch.randn(a, rank, generator=g) for m, (a, b) in shapes.items()},
                       {m: torch.randn(rank, b, generator=g) for m, (a, b) in shapes.items()}, 0.5)


def test_r2_over_modules_of_several_shapes_equals_the_dense_sum():
    g = torch.Generator().manual_seed(0)
    shapes = MIXED_SHAPES
    first, second = random_lora(shapes, g), random_lora(shapes, g)
    shared = TaskSharedKnowledge(rank=3)
    shared.initialise("a", first, generator=g)
    shared.add_task("b")
    with torch.no_grad():
        for p, _ in shared.factors("b").values():
            p.normal_(generator=g)
    dense = sum(((second.delta(m) - shared.shared_delta("b")[m]) ** 2).sum() for m in shapes)
    assert shared.task_shared_loss("b", second).item() == pytest.approx(dense.item(), rel=1e-5)


def test_r1_and_r2_batched_over_modules_and_tasks_equal_their_per_pair_formulas():
    g = torch.Generator().manual_seed(1)
    shapes = MIXED_SHAPES
    current, past = random_lora(shapes, g), [random_lora(shapes, g) for _ in range(3)]
    for w in current.up.values():
        w.requires_grad_(True)
    r1 = sum((old.up[m] @ current.up[m].T).abs().sum() for old in past for m in shapes)
    by_pair = torch.autograd.grad(r1, list(current.up.values()))
    batched = orthogonal_subspace_loss(current, past)
    assert batched.item() == pytest.approx(r1.item(), rel=1e-5)
    for mine, theirs in zip(torch.autograd.grad(batched, list(current.up.values())), by_pair):  # R1's own backward
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)
    r1_mean = torch.stack([(old.up[m].T @ current.up[m]).abs().mean() for old in past for m in shapes]).mean()
    assert orthogonal_subspace_loss(current, past, "mean", "subspace").item() == pytest.approx(r1_mean.item(), rel=1e-5)

    shared = TaskSharedKnowledge(rank=3)
    shared.initialise("a", past[0], generator=g)
    for name in "bc":
        shared.add_task(name)
        with torch.no_grad():
            for p, _ in shared.factors(name).values():
                p.normal_(generator=g)
    loras = dict(zip("abc", past))
    one_by_one = sum(shared.task_shared_loss(n, loras[n]) for n in "abc")
    dense = sum(((loras[n].delta(m) - shared.shared_delta(n)[m]) ** 2).sum() for n in "abc" for m in shapes)
    assert shared.task_shared_loss_sum(loras).item() == pytest.approx(one_by_one.item(), rel=1e-5)
    assert shared.task_shared_loss_sum(loras).item() == pytest.approx(dense.item(), rel=1e-5)


def shared_of_three(g: torch.Generator) -> tuple[TaskSharedKnowledge, dict]:
    """R2's state over tasks a, b, c with H_b, H_c moved off their start."""
    loras = {n: random_lora(MIXED_SHAPES, g) for n in "abc"}
    shared = TaskSharedKnowledge(rank=3)
    shared.initialise("a", loras["a"], generator=g)
    for name in "bc":
        shared.add_task(name)
        with torch.no_grad():
            for p, _ in shared.factors(name).values():
                p.normal_(generator=g)
    return shared, loras


def test_r2_step_two_joint_gets_the_gradients_of_the_alternating_pass():
    # one backward of Σ_i R2(task i) gives ΔW_c the gradient of its own term only (step 1 of Eq. 7), and H, W_* that
    # of every term (step 2) -- what the two passes of the printed alternation give at the same ΔW_c
    from cidm.methods.cidm import frozen_parameters

    shared, loras = shared_of_three(torch.Generator().manual_seed(2))
    current = loras["c"]
    for w in [*current.up.values(), *current.down.values()]:
        w.requires_grad_(True)
    shared.task_shared_loss_sum(loras).backward()
    joint_lora = [w.grad.clone() for w in [*current.up.values(), *current.down.values()]]
    joint_shared = [p.grad.clone() for p in shared.parameters()]
    for w in [*current.up.values(), *current.down.values(), *shared.parameters()]:
        w.grad = None

    with frozen_parameters(shared):  # step 1: task c's own term, H and W_* fixed
        shared.task_shared_loss("c", current).backward()
    assert all(p.grad is None and p.requires_grad for p in shared.parameters())
    for joint, w in zip(joint_lora, [*current.up.values(), *current.down.values()]):
        assert torch.allclose(w.grad, joint, rtol=1e-4, atol=1e-5)
    fixed = LoRAWeights({m: w.detach() for m, w in current.up.items()},
                        {m: w.detach() for m, w in current.down.items()}, current.scale)
    shared.task_shared_loss_sum({**loras, "c": fixed}).backward()  # step 2: every term, ΔW fixed
    assert len(joint_shared) == 12  # U, V, P, Q for each of the three shape groups
    for joint, p in zip(joint_shared, shared.parameters()):
        assert joint.abs().max() > 0 and torch.allclose(p.grad, joint, rtol=1e-4, atol=1e-5)


def test_r2_state_keeps_each_task_s_factors_through_remove_and_replace():
    shared, _ = shared_of_three(torch.Generator().manual_seed(4))
    before = {n: shared.shared_delta(n) for n in "abc"}
    shared.remove_task("b")
    assert shared.tasks == ["a", "c"]
    for name in "ac":
        assert all(torch.equal(shared.shared_delta(name)[m], before[name][m]) for m in MIXED_SHAPES)
    shared.add_task("a")  # learned again: H_a starts over (at 0) and a moves to the end
    assert shared.tasks == ["c", "a"]
    assert all(shared.shared_delta("a")[m].abs().max() == 0 for m in MIXED_SHAPES)
    assert all(torch.equal(shared.shared_delta("c")[m], before["c"][m]) for m in MIXED_SHAPES)
    with pytest.raises(ValueError, match="already"):
        shared.put_task("c", shared.factors("c"))


def test_r2_state_survives_a_round_trip(studio):
    from cidm.methods.cidm import read_task_shared

    saved = read_task_shared(studio.library)
    assert saved.tasks == ["medic", "bolt", "pixelart"]
    for name in saved.tasks:
        assert saved.task_shared_loss(name, studio.loras[name]).item() == pytest.approx(
            studio.method.shared.task_shared_loss(name, studio.loras[name]).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# EWA


def test_ewa_weights_follow_the_paper_and_the_code():
    c_hat = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # (L=1, N=2, D=2)
    e_hat = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]]])  # (T=3, L=1, D=2)
    paper = elastic_weights(c_hat, e_hat, "paper")[0]
    M = torch.tensor([1.0, 0.8, 0.0])  # max cosine per task; negative counts as 0
    expected = M ** 2 / (M ** 2).norm()
    torch.testing.assert_close(paper, expected)
    code = elastic_weights(c_hat, e_hat, "code")[0]
    torch.testing.assert_close(code, 0.8 * M ** 4 / (M ** 4).sum())
    assert code.sum().item() == pytest.approx(0.8)
    sharp = elastic_weights(c_hat, e_hat, "sharp")[0]
    torch.testing.assert_close(sharp, M ** 8 / (M ** 8).norm())
    assert sharp[1] < 0.2 < paper[1]  # a look-alike at 0.8 keeps much less of its LoRA
    with pytest.raises(ValueError, match="psi must be one of paper, code, sharp"):
        elastic_weights(c_hat, e_hat, "softmax")


def test_ewa_scores_each_slot_by_its_best_prompt_token_so_a_named_concept_scores_one():
    c_hat = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # the prompt holds both slots of task 0: (L=1, N=2, D=2)
    named = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # task 0's two slots: (S=2, L=1, D=2)
    look_alike = torch.tensor([[[0.8, 0.6]], [[0.6, 0.8]]])  # both slots near the slots' mean (0.71, 0.71)
    M = elastic_weights(c_hat, [named, look_alike], "code")[0] / 0.8
    torch.testing.assert_close(M, torch.tensor([1.0, 0.8 ** 4]) / (1 + 0.8 ** 4))  # rows averaged first: both 0.71


def test_ewa_puts_the_largest_weight_on_the_named_concept(studio):
    for k, name in enumerate(studio.names):
        for prompt in (f"a photo of a <{name}>", f"a photo of a <{name}> on a beach"):
            w = ewa_weights(studio.tokens, studio.names, prompt)  # (L, T), token space
            assert w.mean(0).argmax().item() == k, (prompt, w.mean(0))


def test_ewa_encoded_space_gives_per_layer_weights_too(studio):
    w = ewa_weights(studio.tokens, studio.names, "a photo of a <bolt>", space="encoded")
    assert w.shape == (7, 3) and torch.isfinite(w).all()


def test_ewa_weights_are_per_layer_and_per_task(studio):
    w = ewa_weights(studio.tokens, studio.names, "a photo of a <bolt>")
    assert w.shape == (7, 3)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(7))  # ψ = M²/‖M²‖ per layer


def test_unmerge_restores_base_weights_exactly(studio):
    from cidm.attention import install_processors

    unet = studio.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layers = install_processors(unet)
    weights = ewa_weights(studio.tokens, studio.names, "a photo of a <bolt>")
    with merged(unet, layers, list(studio.loras.values()), weights):
        changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("attn2" in k for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_a_batch_of_prompts_equals_one_call_per_prompt_with_each_prompts_own_ewa_weights(studio):
    prompts = ["a photo of a <medic>", "a photo of a <bolt> on a beach", "a picture in <pixelart> style"]
    weights = [ewa_weights(studio.tokens, studio.names, p) for p in prompts]
    assert not torch.allclose(weights[0], weights[1])  # the batch needs per-sample weights
    alone = [np.asarray(im, np.float32) for p in prompts for im in studio.generate(p, steps=3, num_images=2)]
    batch = [np.asarray(im, np.float32) for im in studio.generate(prompts, steps=3, num_images=2)]
    assert len(batch) == 6
    for a, b in zip(alone, batch):
        assert np.abs(a - b).max() <= 1.0  # float rounding at most
    assert np.abs(batch[0] - batch[2]).mean() > 1.0  # and the prompts do differ


def test_per_sample_deltas_equal_a_merge_per_sample(studio):
    from cidm.attention import install_processors

    unet = studio.pipe.unet
    layers = install_processors(unet)
    loras = [LoRAWeights({m: 1000 * u for m, u in lora.up.items()}, lora.down, lora.scale)  # large enough to show
             for lora in studio.loras.values()]
    weights = torch.rand(2, 7, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=text).sample
        with merged(unet, layers, loras, weights):
            mixed = unet(x, 10, encoder_hidden_states=text).sample
        for b in range(2):
            with merged(unet, layers, loras, weights[b]):
                one = unet(x[b:b + 1], 10, encoder_hidden_states=text[b:b + 1]).sample
            torch.testing.assert_close(mixed[b:b + 1], one, atol=1e-5, rtol=1e-4)
    assert (mixed - plain).abs().mean() > 1e-2


def test_per_sample_weights_leave_the_base_weights_and_refuse_a_wrong_batch(studio):
    from cidm.attention import install_processors

    unet = studio.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layers = install_processors(unet)
    weights = torch.rand(3, 7, 3)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="a batch of 2 samples, but EWA weights for 3"):
        with merged(unet, layers, list(studio.loras.values()), weights):
            assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
            unet(x, 10, encoder_hidden_states=text)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_mixed_precision_generation_stays_close_to_full_precision(studio):
    full = image(studio, "a photo of a <bolt>")
    bf16 = image(studio, "a photo of a <bolt>", mixed_precision="bf16")
    assert 0 < np.abs(full - bf16).mean() < 4.0
    with pytest.raises(ValueError, match="mixed_precision must be"):
        image(studio, "a photo of a <bolt>", mixed_precision="fp8")


def test_merge_refuses_non_finite_weights(studio):
    from cidm.attention import install_processors

    bad = studio.loras["medic"]
    module = bad.modules[0]
    broken = LoRAWeights({**bad.up, module: bad.up[module] * float("nan")}, bad.down, bad.scale)
    layers = install_processors(studio.pipe.unet)
    before = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        with merged(studio.pipe.unet, layers, [broken], torch.ones(7, 1)):
            pass
    assert all(torch.equal(v, before[k]) for k, v in studio.pipe.unet.state_dict().items())


# --------------------------------------------------------------------------------------------------------------
# inputs and the library's rules


def test_unknown_concept_lists_the_known_ones(studio):
    with pytest.raises(ValueError, match=r"unknown concept <dog>.*<medic>, <bolt>, <pixelart>"):
        studio.generate("a photo of a <dog>", steps=2)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "Has Space", "UPPER", "x" * 41, "..", "tab\tname", "é"])
def test_bad_names_are_refused_with_the_rule(name):
    with pytest.raises(LibraryError, match="lower-case letters"):
        validate_name(name)


def test_existing_name_is_refused_unless_replacing(studio):
    with pytest.raises(LibraryError, match="already exists"):
        learn(studio, "medic", steps=1)


def test_cancel_leaves_the_library_as_it_was(studio):
    manifest = (studio.library.root / "library.json").read_bytes()
    result = learn(studio, "donut", steps=50, cancel=lambda: True)
    assert result.cancelled and result.steps_done == 1
    assert (studio.library.root / "library.json").read_bytes() == manifest
    assert "donut" not in studio.names and "donut" not in studio.tokens.names
    assert not (studio.library.root / "donut").exists()


def test_library_learned_on_another_base_is_refused(studio, tmp_path):
    lib = Library(studio.library.root)
    with pytest.raises(LibraryError, match="learned on base model"):
        lib.check_base("some-org/other-model", 16)


def test_tokens_of_another_model_are_refused(studio):
    with pytest.raises(ValueError, match="cross-attention layers"):
        studio.tokens.add("odd", torch.zeros(5, 32))
