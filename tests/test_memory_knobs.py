"""GPU memory knobs change how a task is computed, not what it learns: gradient checkpointing gives the same
adapter, bf16 autocast a close one; 8-bit Adam without bitsandbytes is a clear error that keeps the library."""

import importlib.util

import pytest
import torch

from cidm.studio import Studio
from test_core import base, learn  # noqa: F401  (module fixture, helper)


def trained(base, path, **knobs):
    from conftest import make_tiny_pipeline

    studio = Studio(path, pipe=make_tiny_pipeline(), info=base[1])
    studio.record_forgetting = False
    learn(studio, "medic", steps=3, **knobs)
    return studio.loras["medic"], studio


def test_gradient_checkpointing_learns_the_same_adapter(base, tmp_path):
    plain, _ = trained(base, tmp_path / "a")
    ckpt, studio = trained(base, tmp_path / "b", gradient_checkpointing=True)
    assert all(torch.allclose(plain.up[m], ckpt.up[m], atol=1e-6) for m in plain.up)
    assert not studio.pipe.unet.is_gradient_checkpointing  # switched off again after the task


def test_bf16_autocast_learns_a_close_adapter(base, tmp_path):
    plain, _ = trained(base, tmp_path / "a")
    bf16, _ = trained(base, tmp_path / "b", mixed_precision="bf16")
    assert all(b.dtype == torch.float32 for b in bf16.up.values())  # fp32 master weights
    a = torch.cat([plain.up[m].flatten() for m in plain.up])
    b = torch.cat([bf16.up[m].flatten() for m in plain.up])
    assert not torch.equal(a, b)  # computed in bf16 …
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.8  # … learning the same thing


def test_unknown_precision_and_missing_bitsandbytes_are_clear_errors(base, tmp_path):
    from conftest import make_tiny_pipeline

    studio = Studio(tmp_path / "c", pipe=make_tiny_pipeline(), info=base[1])
    studio.record_forgetting = False
    with pytest.raises(ValueError, match="mixed_precision must be"):
        learn(studio, "medic", steps=1, mixed_precision="fp8")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="bitsandbytes"):
            learn(studio, "medic", steps=1, use_8bit_adam=True)
    assert studio.names == [] and studio.library.names == []
    learn(studio, "medic", steps=1)  # the studio still works
    assert studio.names == ["medic"]
