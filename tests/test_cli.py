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
