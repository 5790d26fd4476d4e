"""Context-controllable synthesis: boxes, masks, region noise estimation (Eq. 5), regional attention (Eq. 4)."""

import numpy as np
import pytest
import torch

from cidm.attention import masks_at
from cidm.regions import pixel_box, region_masks, region_noise_estimation
from test_core import base, studio  # noqa: F401  (module fixtures, shared)


def test_partly_outside_boxes_are_clipped_and_normalised_boxes_scaled():
    assert pixel_box((-10, 5, 30, 80), 64, 64) == (0.0, 5.0, 30.0, 64.0)
    assert pixel_box((0.25, 0.0, 0.5, 1.0), 64, 32) == (16.0, 0.0, 32.0, 32.0)


@pytest.mark.parametrize("box, message", [((10, 10, 10, 20), "empty or inverted"), ((20, 10, 10, 30), "inverted"),
                                          ((70, 0, 90, 10), "outside"), ((1, 2, 3), "4 numbers")])
def test_bad_boxes_are_refused(box, message):
    with pytest.raises(ValueError, match=message):
        pixel_box(box, 64, 64)


def test_masks_take_cells_whose_centre_is_inside():
    m = region_masks([(0, 0, 32, 64), (30, 30, 31, 31)], 64, 64, 16, 16)
    assert m.shape == (2, 16, 16)
    assert m[0, :, :8].all() and not m[0, :, 8:].any()
    assert m[1].sum() == 1  # thinner than a cell: still the cell its centre falls in


def test_masks_at_each_unet_resolution_keep_the_box():
    m = region_masks([(0, 0, 32, 64)], 64, 64, 16, 16)[None]  # (1, 1, 16, 16)
    half = masks_at(m, 8 * 8).view(8, 8)
    assert half[:, :4].all() and not half[:, 4:].any()


def test_region_outside_all_boxes_keeps_global_noise():
    g = torch.Generator().manual_seed(0)
    e0, e1 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    er = torch.randn(1, 2, 4, 8, 8, generator=g)
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1
    masks[1, 2:6, 2:6] = 1
    out = region_noise_estimation(e0, e1, er, masks, guidance=5.0, alpha=0.1)
    E = e0 + 5.0 * (e1 - e0)
    outside = (masks.sum(0) == 0)
    torch.testing.assert_close(out[..., outside], E[..., outside])
    E1 = e0 + 5.0 * (er[:, 0] - e0)
    only_first = (masks[0] == 1) & (masks[1] == 0)
    torch.testing.assert_close(out[..., only_first], (0.1 * E + 0.9 * E1)[..., only_first])
    E2 = e0 + 5.0 * (er[:, 1] - e0)
    both = (masks[0] == 1) & (masks[1] == 1)  # overlaps averaged
    torch.testing.assert_close(out[..., both], (0.1 * E + 0.9 * (E1 + E2) / 2)[..., both])


def test_literal_region_noise_is_the_printed_equation():
    g = torch.Generator().manual_seed(1)
    e0, e1 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    er = torch.randn(1, 1, 4, 8, 8, generator=g)
    masks = torch.zeros(1, 8, 8)
    masks[0, :, :4] = 1
    out = region_noise_estimation(e0, e1, er, masks, 5.0, 0.1, mode="literal")
    E, E1 = e0 + 5.0 * (e1 - e0), e0 + 5.0 * (er[:, 0] - e0)
    torch.testing.assert_close(out, 0.1 * E + 0.9 * E1 * masks[0])


def test_a_region_that_repeats_the_global_prompt_changes_nothing(studio):
    """Regional attention and Eq. 5 with the global prompt in the box reduce to plain generation."""
    plain = np.asarray(studio.generate("a photo of a <medic> on a beach", steps=3)[0], np.float32)
    composed = np.asarray(studio.compose("a photo of a <medic> on a beach",
                                         [((8, 8, 40, 40), "a photo of a <medic> on a beach")], steps=3)[0],
                          np.float32)
    assert np.abs(plain - composed).max() <= 2.0  # float reordering only, in 0..255


def test_regions_change_the_image_inside_their_box_most(studio):
    plain = np.asarray(studio.generate("a photo on a beach", steps=3)[0], np.float32)
    composed = np.asarray(studio.compose("a photo on a beach", [((0, 0, 32, 64), "a <bolt> in <pixelart> style")],
                                         steps=3)[0], np.float32)
    diff = np.abs(plain - composed).mean(-1)
    assert diff[:, :32].mean() > diff[:, 32:].mean()


def test_compose_refuses_bad_requests_with_clear_messages(studio):
    box = (0, 0, 32, 32)
    with pytest.raises(ValueError, match="at most 8"):
        studio.compose("a photo", [(box, "a <medic>")] * 9, steps=1)
    with pytest.raises(ValueError, match="region 2 has an empty prompt"):
        studio.compose("a photo", [(box, "a <medic>"), (box, "  ")], steps=1)
    with pytest.raises(ValueError, match="unknown concept <cat>.*<medic>"):
        studio.compose("a photo", [(box, "a <cat>")], steps=1)
    with pytest.raises(ValueError, match="global prompt is empty"):
        studio.compose("", [(box, "a <medic>")], steps=1)


def test_edit_changes_only_the_box(studio):
    from cidm.toyworld import world as W

    original = W.render(W.random_scene(3, two_object_prob=0.0))
    edited = np.asarray(studio.edit(original, (0, 0, 32, 32), "a photo of a <medic>", strength=1.0, steps=3))
    outside = np.ones((64, 64), bool)
    outside[:32, :32] = False
    np.testing.assert_array_equal(edited[outside], original[outside])
    assert np.abs(edited.astype(int) - original)[:32, :32].mean() > 1.0  # the box was regenerated
    with pytest.raises(ValueError, match="strength"):
        studio.edit(original, (0, 0, 32, 32), "a <medic>", strength=0.0)
