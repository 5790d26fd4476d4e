import socket
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("CIDM_BASE_MODEL", str(tiny_model_dir))
    import app as app_module

    app_module._BASE.clear()
    return app_module


def test_app_serves_its_page(app):
    demo = app.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200
            assert "CIDM Studio" in r.read().decode()
    finally:
        demo.close()


def test_generate_returns_an_image_of_the_model_size(app):
    image = app.generate("a photo of a red star on a beach", seed=0, steps=2, guidance=5.0)
    assert image.size == (64, 64)


def test_empty_prompt_is_a_clear_error(app):
    import gradio as gr

    with pytest.raises(gr.Error, match="prompt is empty"):
        app.generate("   ", seed=0, steps=2, guidance=5.0)
