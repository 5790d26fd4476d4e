import dataclasses

import numpy as np
import pytest

from cidm.toyworld import concepts as C
from cidm.toyworld import world as W


def test_world_is_deterministic_per_seed():
    a, caps_a, _ = W.batch(range(100, 116))
    b, caps_b, _ = W.batch(range(100, 116))
    np.testing.assert_array_equal(a, b)
    assert caps_a == caps_b
    c, _, _ = W.batch(range(200, 216))
    assert not np.array_equal(a, c)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    scene = W.random_scene(7)
    assert W.coarse_caption(scene, rng_a) == W.coarse_caption(scene, rng_b)


def test_caption_names_what_is_drawn():
    glyph = W.Glyph("square", "white", "cross", "red")
    layers = (W.Layer("square", (245, 245, 245)), W.Layer("cross", (220, 30, 30), 0.6))
    scene = W.Scene((W.Thing(glyph, layers),), "snow", ((32, 32, 20),), 5)
    assert scene.caption == "a photo of a white square with a red cross in the snow"
    img = W.render(scene).astype(int)
    assert img.shape == (64, 64, 3)
    assert np.abs(img[32, 32] - (220, 30, 30)).sum() < 20  # the inner cross at the centre
    assert np.abs(img[32, 16] - (245, 245, 245)).sum() < 20  # the outer square beside it, outside the cross arm
    striped = W.Glyph("triangle", "orange", "stripes", "black")
    assert striped.phrase() == "an orange triangle with black stripes"
    assert striped.phrase({"colour": False, "inner_colour": False}) == "a triangle with stripes"
    assert glyph.phrase({"shape": False, "colour": False, "inner": False}) == "a thing with red inside"
    styled = dataclasses.replace(scene, style="grayscale")
    assert styled.caption.endswith("in the snow in grayscale style")
    grey = W.render(styled).astype(int)
    assert (grey.max(-1) - grey.min(-1) <= 1).all()  # grayscale: no colour left


def test_shapes_have_distinct_masks():
    u, v = np.meshgrid(np.arange(-32, 32) + 0.5, np.arange(-32, 32) + 0.5)
    masks = {s: W.shape_mask(s, u, -v, 20) for s in W.SHAPES}
    for s1 in W.SHAPES:
        assert masks[s1].sum() > 200
        for s2 in W.SHAPES:
            if s1 < s2:
                iou = (masks[s1] & masks[s2]).sum() / (masks[s1] | masks[s2]).sum()
                assert iou < 0.85, (s1, s2, iou)


def test_every_named_colour_stays_nearest_to_itself_under_jitter():
    rng = np.random.default_rng(0)
    centres = {n: np.array(c) for n, c in W.COLOURS.items()}
    assert len(centres) >= 12
    for name in W.COLOURS:
        for _ in range(50):
            shade = np.array(W.jitter(name, rng))
            nearest = min(centres, key=lambda n: np.abs(centres[n] - shade).sum())
            assert nearest == name, (name, shade)


def test_excluded_colour_context_pairs_never_occur():
    _, _, scenes = W.batch(range(2000))
    for s in scenes:
        for g in s.glyphs:
            assert (g.colour, s.context) not in W.EXCLUDED
            assert s.context != f"bg:{g.colour}"
            assert g.inner_colour != g.colour


def test_base_sampler_never_draws_a_personal_combination():
    """The held-out rule: no base training scene holds a combination reserved for personal concepts; the shipped
    concepts' combinations are reserved, and so are new random concepts'."""
    seen = set()
    for seed in range(6000):
        for g in W.random_scene(seed).glyphs:
            assert not W.is_personal(g), g
            seen.add(g.combination)
    shipped = {glyph.combination for glyph, _ in C.OBJECTS.values()}
    assert not shipped & seen and all(W.is_personal(glyph) for glyph, _ in C.OBJECTS.values())
    for seed in range(20):
        glyph, layers = C.random_object(seed)
        assert W.is_personal(glyph) and glyph.combination not in seen and glyph.combination not in shipped
        assert layers[0].shape == glyph.shape
    # the family is there: each shipped concept's parts, and its outer glyph, appear in base scenes
    parts = {(c[0], c[1]) for c in seen} | {(c[2], c[3]) for c in seen}
    for glyph, _ in C.OBJECTS.values():
        assert (glyph.shape, glyph.colour) in parts and (glyph.inner, glyph.inner_colour) in parts, glyph
    # the evaluator's hard negatives obey the rule too
    from cidm.toyworld.train import variants

    rng = np.random.default_rng(0)
    for seed in range(300):
        for scene in variants(seed, rng):
            assert not W.is_personal(scene.glyphs[0])


def test_concepts_render_their_exact_instance():
    medic, _ = C.reference_images("medic", n=5)
    assert len(medic) == 5 and all(im.shape == (64, 64, 3) for im in medic)
    red = np.array(C.OBJECTS["medic"][1][1].rgb)
    assert all((np.abs(im.astype(int) - red).sum(-1) < 12).sum() > 20 for im in medic)  # its red cross
    styles = {n: C.reference_images(n, n=2)[0] for n in C.STYLES}
    for n, ims in styles.items():
        for m, other in styles.items():
            if n < m:
                assert np.abs(ims[0].astype(int) - other[0].astype(int)).mean() > 10, (n, m)
    with pytest.raises(KeyError, match="unknown toy concept"):
        C.lookup("nope")
    assert C.spec("random-style-3").kind == "style" and C.spec("random-object-3").kind == "object"


def test_the_longer_tuning_set_holds_new_concepts_of_both_kinds_and_no_reported_one(tmp_path):
    from cidm.bench.results import load_concept_set

    names = C.write_tuning_set(tmp_path, objects=2, styles=1, seed=40)
    assert names == ["target", "kite", "popart", "random-object-40", "random-object-41", "random-style-40"]
    spec = load_concept_set(tmp_path)
    assert spec["tuning_sequence"] == names and not set(names) & set(C.STANDARD_SEQUENCE)
    kinds = [spec["concepts"][n]["kind"] for n in names]
    assert kinds.count("style") == 2 and kinds.count("object") == 4
    for name in names:
        c = spec["concepts"][name]
        assert len(c["reference_images"]) == 5 and c["eval_prompts"][0].count(f"<{name}>") == 1
    objects = [C.lookup(n)[0].combination for n in names[3:5]]
    assert not set(objects) & C.SHIPPED_COMBINATIONS and objects[0] != objects[1]
