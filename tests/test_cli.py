import json
import subprocess
import sys


def run(*args, **env):
    import os

    return subprocess.run([sys.executable, "-m", "cidm", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=120)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    assert "info" in out.stdout and "toyworld" in out.stdout


def test_info_runs_offline_and_names_the_base_model(tiny_model_dir):
    out = run("info", CIDM_BASE_MODEL=str(tiny_model_dir))
    assert out.returncode == 0, out.stderr
    assert f"base model {tiny_model_dir}" in out.stdout
    assert "torch 2." in out.stdout


def test_info_load_lists_layers(tiny_model_dir):
    out = run("info", "--load", "--base-model", str(tiny_model_dir))
    assert out.returncode == 0, out.stderr
    assert "cross-attention layers (7" in out.stdout


def test_bad_base_model_is_a_clear_error_not_a_traceback(tmp_path):
    out = run("info", "--load", "--base-model", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "no local folder" in out.stderr and "Traceback" not in out.stderr


def test_bench_tune_rejects_a_malformed_setting_to_try(tmp_path):
    out = run("bench", "--tune", "--out", str(tmp_path / "t"), "--also-try", "cidm:lr_lora")
    assert out.returncode == 2
    assert "--also-try takes METHOD:SETTING=VALUE" in out.stderr and "Traceback" not in out.stderr
    out = run("bench", "--tune", "--out", str(tmp_path / "u"), "--methods", "lora-m", "--also-try",
              "lora-m:not_a_setting=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown setting(s) not_a_setting" in out.stderr and not (tmp_path / "u" / "lora-m_not_a_setting=1").exists()
    out = run("bench", "--tune", "--out", str(tmp_path / "v"), "--also-try", "cidm:r1_form=subspace,gamma1")
    assert out.returncode == 2 and "--also-try takes METHOD:SETTING=VALUE" in out.stderr
    out = run("bench", "--tune", "--out", str(tmp_path / "w"), "--methods", "cidm", "--also-try",
              "cidm:psi=sharpest,gamma1=0.1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "psi must be one of paper, code, sharp" in out.stderr and not list(tmp_path.glob("w/cidm_*"))
    out = run("bench", "--tune", "--out", str(tmp_path / "x"), "--grid", "0.1,ten")
    assert out.returncode == 2 and "--grid takes comma-separated numbers" in out.stderr


def test_learn_generate_and_compose_from_the_command_line(tiny_model_dir, tmp_path):
    from PIL import Image

    from cidm.toyworld import concepts as C

    paths = []
    for i, img in enumerate(C.reference_images("medic", n=3)[0]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    env = {"CIDM_BASE_MODEL": str(tiny_model_dir), "OMP_NUM_THREADS": "1"}
    lib = str(tmp_path / "lib")
    out = run("learn", "--library", lib, "--name", "medic", "--class-word", "square", "--steps", "2",
              "--images", *paths, **env)
    assert out.returncode == 0, out.stderr
    assert "learned <medic>" in out.stdout
    out = run("generate", "--library", lib, "--prompt", "a photo of a <medic>", "--steps", "2", "--num-images", "2",
              "--out", str(tmp_path / "g.png"), **env)
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "g-1.png").size == (64, 64)
    # several prompts in one call: images prompt by prompt, each PNG saying how it was made
    out = run("generate", "--library", lib, "--prompt", "a photo of a <medic>", "--prompt", "a photo on a beach",
              "--steps", "2", "--num-images", "2", "--seed", "3", "--out", str(tmp_path / "m.png"), **env)
    assert out.returncode == 0, out.stderr
    made = [json.loads(Image.open(tmp_path / f"m-{i}.png").text["parameters"]) for i in range(4)]
    assert [m["prompt"] for m in made] == ["a photo of a <medic>"] * 2 + ["a photo on a beach"] * 2
    assert made[0]["seed"] == 3 and made[0]["steps"] == 2 and made[0]["concepts"] == ["medic"]
    out = run("compose", "--library", lib, "--prompt", "a photo on a beach", "--region", "0,0,32,64:a <medic>",
              "--steps", "2", "--out", str(tmp_path / "c.png"), **env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.png").is_file()
    out = run("compose", "--library", lib, "--prompt", "a photo", "--region", "0,0,32:a <medic>",
              "--out", str(tmp_path / "bad.png"), **env)
    assert out.returncode == 2 and "x0,y0,x1,y1:prompt" in out.stderr
    out = run("generate", "--library", lib, "--prompt", "a <nope>", "--out", str(tmp_path / "n.png"), **env)
    assert out.returncode == 2 and "known concepts: <medic>" in out.stderr


def test_bench_core_learns_with_the_bases_default_steps_unless_told(monkeypatch, tmp_path):
    import cidm.bench.core
    from cidm.cli import main

    calls = []
    monkeypatch.setattr(cidm.bench.core, "run_core_bench", lambda out, **kw: calls.append(kw))
    assert main(["bench", "--core", "--out", str(tmp_path / "a")]) == 0
    assert main(["bench", "--core", "--out", str(tmp_path / "b"), "--steps", "40"]) == 0
    assert [c["steps"] for c in calls] == [None, 40]  # None: as `cidm learn`, the base folder's default
