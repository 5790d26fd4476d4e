"""A kill -9 in the middle of learning leaves the library byte-identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from cidm.toyworld import concepts as C


def write_images(folder: Path, name: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(C.reference_images(name)[0]):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def cli(*args):
    return [sys.executable, "-m", "cidm", *args]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_9_during_learning_leaves_library_byte_identical(tiny_model_dir, tmp_path):
    env = {**os.environ, "CIDM_BASE_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    library = tmp_path / "lib"
    first = subprocess.run(cli("learn", "--library", str(library), "--name", "medic", "--class-word", "square",
                               "--steps", "3", "--images", *write_images(tmp_path / "medic", "medic")),
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = snapshot(library)
    assert "library.json" in before and "medic/pytorch_lora_weights.safetensors" in before

    proc = subprocess.Popen(cli("learn", "--library", str(library), "--name", "bolt", "--class-word", "triangle",
                                "--steps", "400", "--images", *write_images(tmp_path / "bolt", "bolt")),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    line = ""
    while time.time() < deadline and not line.startswith("step"):
        line = proc.stdout.readline()
    assert line.startswith("step"), "learning never reported progress"
    assert any(p.name.startswith(".staging-") for p in library.iterdir())  # it was writing beside the concepts
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    after = {k: v for k, v in snapshot(library).items() if not k.startswith(".staging-")}
    assert after == before
    # and the next session sweeps the leftovers and sees exactly the old library
    from cidm.library import Library

    lib = Library(library)
    assert lib.names == ["medic"]
    assert not any(p.name.startswith(".staging-") for p in library.iterdir())
