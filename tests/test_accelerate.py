"""`accelerate launch -m cidm learn` trains data-parallel: two CPU processes (gloo) keep identical weights, take the
same number of optimizer steps as one process, and the concept is written to the library once."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import write_photos


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(os.path.join(
    os.path.dirname(sys.executable), "accelerate")), reason="the accelerate launcher is not installed")
def test_two_process_learning_matches_single_process_semantics(tiny_model_dir, tmp_path):
    (tmp_path / "photos").mkdir()
    photos = write_photos(tmp_path / "photos", "medic")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    common = ["-m", "cidm", "learn", "--name", "medic", "--class-word", "cross", "--images", *photos,
              "--steps", "4", "--base-model", str(tiny_model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--multi_gpu` is accelerate's torchrun launcher; without GPUs the processes join a gloo group on the CPU
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", *common,
                          "--library", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("learned <medic>") == 1  # the main process reports; the helper writes nothing
    one = subprocess.run([sys.executable, *common, "--library", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    manifests = {k: json.loads((tmp_path / k / "library.json").read_text()) for k in ("one", "two")}
    for m in manifests.values():
        assert list(m["concepts"]) == ["medic"]
    steps = {k: m["concepts"]["medic"]["training"]["steps"] for k, m in manifests.items()}
    assert steps["one"] == steps["two"] == 4
    assert "(4 steps)" in one.stdout and "(4 steps × 2 processes, data-parallel)" in two.stdout
    assert [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".staging")] == []
    assert (tmp_path / "two" / "medic" / "pytorch_lora_weights.safetensors").is_file()
