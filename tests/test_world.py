import numpy as np

from cidm.toyworld import world as W


def test_world_is_deterministic_per_seed():
    a, caps_a, _ = W.batch(range(100, 116))
    b, caps_b, _ = W.batch(range(100, 116))
    np.testing.assert_array_equal(a, b)
    assert caps_a == caps_b
    c, _, _ = W.batch(range(200, 216))
    assert not np.array_equal(a, c)


def test_caption_names_what_is_drawn():
    scene = W.Scene((("star", "orange", "striped"),), "snow", ((32, 32, 18),), 5)
    assert scene.caption == "a photo of a striped orange star in the snow"
    img = W.render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    centre = img[28:36, 28:36].reshape(-1, 3)
    orange = np.array(W.COLOURS["orange"])
    assert (np.abs(centre.astype(int) - orange).sum(1) < 30).any()  # the star's colour is at its centre


def test_shapes_have_distinct_masks():
    u, v = np.meshgrid(np.arange(-32, 32) + 0.5, np.arange(-32, 32) + 0.5)
    masks = {s: W.shape_mask(s, u, -v, 20) for s in W.SHAPES}
    for s1 in W.SHAPES:
        assert masks[s1].sum() > 200
        for s2 in W.SHAPES:
            if s1 < s2:
                iou = (masks[s1] & masks[s2]).sum() / (masks[s1] | masks[s2]).sum()
                assert iou < 0.85, (s1, s2, iou)


def test_excluded_colour_context_pairs_never_occur():
    _, _, scenes = W.batch(range(2000))
    for s in scenes:
        for _, colour, _ in s.objects:
            assert (colour, s.context) not in W.EXCLUDED
            assert s.context != f"bg:{colour}"
